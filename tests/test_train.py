"""The training loop: restart bit for bit, interruption, multitask sampling and encoding, data parallelism.

Every test trains a tiny float64 DPA3 on tiny generated data (a few frames of 6 atoms), so that what is
checked is the algorithm, in seconds.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from scipy import stats

import dpa3_ref
from dpa3_ref.checkpoint import leaves_by_name
from dpa3_ref.errors import Dpa3Error
from dpa3_ref.inputs import parse_input
from dpa3_ref.train import Trainer, TrainingInterrupted, draw_head, train

TINY_MODEL = {
    "type_map": ["O", "H"],
    "descriptor": {"type": "dpa3", "precision": "float64", "activation_function": "silut:3.0",
                   "repflow": {"n_dim": 8, "e_dim": 4, "a_dim": 4, "nlayers": 1, "e_rcut": 4.0, "e_rcut_smth": 3.5,
                               "e_sel": 20, "a_rcut": 3.0, "a_rcut_smth": 2.5, "a_sel": 6, "axis_neuron": 2,
                               "smooth_edge_update": True}},
    "fitting_net": {"neuron": [8, 8], "precision": "float64"},
}


def write_system(path: Path, n_frames: int, seed: int, energy_shift: float = 0.0, periodic: bool = True) -> Path:
    """A deepmd/npy system of `n_frames` frames of O2H4 in a 5 Å box with random labels."""
    rng = np.random.default_rng(seed)
    (path / "set.000").mkdir(parents=True)
    (path / "type_map.raw").write_text("O\nH\n")
    (path / "type.raw").write_text("0 0 1 1 1 1\n")
    grid = np.array([[0, 0, 0], [2, 0, 0], [0, 2, 0], [2, 2, 0], [0, 0, 2], [2, 0, 2]], float)
    coord = grid[None] + 0.5 + rng.uniform(-0.2, 0.2, (n_frames, 6, 3))
    np.save(path / "set.000/coord.npy", coord.reshape(n_frames, -1))
    np.save(path / "set.000/energy.npy", rng.normal(size=n_frames) + energy_shift)
    np.save(path / "set.000/force.npy", rng.normal(size=(n_frames, 18)))
    if periodic:
        np.save(path / "set.000/box.npy", np.tile(np.eye(3).ravel() * 5.0, (n_frames, 1)))
        np.save(path / "set.000/virial.npy", rng.normal(size=(n_frames, 9)))
    else:
        (path / "nopbc").touch()
    return path


def single_input(tmp_path: Path, numb_steps: int, **training) -> dict:
    write_system(tmp_path / "train", 5, seed=1)
    write_system(tmp_path / "valid", 2, seed=2)
    return {
        "model": TINY_MODEL,
        "learning_rate": {"start_lr": 1e-2, "stop_lr": 1e-4, "decay_steps": 2},
        "loss": {"start_pref_e": 0.2, "limit_pref_e": 20, "start_pref_f": 100, "limit_pref_f": 60,
                 "start_pref_v": 0.02, "limit_pref_v": 1},
        "optimizer": {"type": "AdamW", "weight_decay": 1e-3},
        "training": {"training_data": {"systems": [str(tmp_path / "train")], "batch_size": 2},
                     "validation_data": {"systems": [str(tmp_path / "valid")], "batch_size": 1},
                     "numb_steps": numb_steps, "seed": 3, "disp_freq": 2, "save_freq": 3,
                     "gradient_max_norm": 1.0, **training},
    }


def arrays(path) -> dict[str, np.ndarray]:
    model = dpa3_ref.checkpoint.load_model(path) if str(path).endswith(".npz") else path
    return {k: np.asarray(v) for k, v in leaves_by_name(model).items()}


def test_restart_continues_bit_for_bit(tmp_path):
    """N + M steps after a restart (and after a SIGTERM) equal N + M steps in one go."""
    data = single_input(tmp_path, numb_steps=6)
    config = parse_input(data, tmp_path)
    whole = tmp_path / "whole"
    whole.mkdir()
    train(config, whole, progress=False, plots=False)

    parts = tmp_path / "parts"
    parts.mkdir()
    stop_after = 4
    original_run_step = Trainer.run_step

    def interrupted(self, step):
        result = original_run_step(self, step)
        if step + 1 == stop_after:
            self.request_stop(signal.SIGTERM, None)
        return result

    Trainer.run_step = interrupted
    try:
        with pytest.raises(TrainingInterrupted) as stopped:
            train(config, parts, progress=False, plots=False)
    finally:
        Trainer.run_step = original_run_step
    assert stopped.value.checkpoint.name == f"model.ckpt-{stop_after}.npz" and stopped.value.step == stop_after
    train(config, parts, restart=stopped.value.checkpoint, progress=False, plots=False)

    first, second = arrays(whole / "model.npz"), arrays(parts / "model.npz")
    assert first.keys() == second.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    whole_curve = (whole / "lcurve.out").read_text().splitlines()
    parts_curve = [line for line in (parts / "lcurve.out").read_text().splitlines() if not line.startswith("#")]
    assert [line for line in whole_curve if not line.startswith("#")] == parts_curve
    # the restart appended to lcurve.out and, as deepmd-kit does, wrote the header again before its rows
    headers = [line for line in (parts / "lcurve.out").read_text().splitlines() if line.startswith("# step")]
    assert headers == [whole_curve[0]] * 2
    assert sorted(p.name for p in parts.glob("model.ckpt-*.npz"))[-1] == "model.ckpt-6.npz"


def test_checkpoints_are_pruned_and_restore_the_optimizer(tmp_path):
    data = single_input(tmp_path, numb_steps=6, save_freq=1, max_ckpt_keep=2)
    config = parse_input(data, tmp_path)
    train(config, tmp_path, progress=False, plots=False)
    assert sorted(p.name for p in tmp_path.glob("model.ckpt-*.npz")) == ["model.ckpt-5.npz", "model.ckpt-6.npz"]
    assert (tmp_path / "checkpoint").read_text().strip() == "model.ckpt-6.npz"
    trainer = Trainer(config, tmp_path)
    trainer.restore(tmp_path / "model.ckpt-6.npz")
    state = trainer.state
    assert state.step == 6 and int(state.opt_state[-1].count) == 6
    model = dpa3_ref.load(tmp_path / "model.npz").model
    np.testing.assert_array_equal(model.out_bias, state.model.out_bias["Default"])


def test_init_model_starts_from_its_weights_and_offsets(tmp_path):
    """--init-model: M's weights and its statistics/offsets (not recomputed), step 0: one Adam step from M moves
    each weight by at most ~ the learning rate, and leaves the buffers exactly as they were."""
    data = single_input(tmp_path, numb_steps=2)
    config = parse_input(data, tmp_path)
    first = tmp_path / "first"
    first.mkdir()
    start = train(config, first, progress=False, plots=False)
    again = tmp_path / "again"
    again.mkdir()
    one_step = parse_input({**data, "training": {**data["training"], "numb_steps": 1}}, tmp_path)
    out = train(one_step, again, init_model=start, progress=False, plots=False)
    before, after = arrays(start), arrays(out)
    for name, value in before.items():
        if any(buffer in name for buffer in ("out_bias", "davg", "dstd", "bias_atom_e")):
            np.testing.assert_array_equal(value, after[name], err_msg=name)
        else:
            assert np.max(np.abs(value - after[name]), initial=0) <= 1.01e-2 * (1 + 1e-3 * np.abs(value).max(initial=0)), name
    assert sum(not np.array_equal(before[n], after[n]) for n in before) > 5
    mismatched = json.loads(json.dumps(data))
    mismatched["model"]["fitting_net"]["neuron"] = [8, 4]
    with pytest.raises(Dpa3Error, match="fitting_neuron"):
        train(parse_input(mismatched, tmp_path), again, init_model=start, progress=False, plots=False)


def multitask_input(tmp_path: Path, numb_steps: int) -> dict:
    write_system(tmp_path / "water", 4, seed=1)
    write_system(tmp_path / "molecules", 4, seed=2, energy_shift=30.0, periodic=False)
    loss = {"start_pref_e": 1, "limit_pref_e": 1, "start_pref_f": 1, "limit_pref_f": 1}
    return {
        "model": {"shared_dict": {"types": ["O", "H"], "descriptor": TINY_MODEL["descriptor"],
                                  "fitting": {**TINY_MODEL["fitting_net"], "dim_case_embd": 2}},
                  "model_dict": {name: {"type_map": "types", "descriptor": "descriptor", "fitting_net": "fitting"}
                                 for name in ("water", "molecules")}},
        "learning_rate": {"start_lr": 1e-3, "stop_lr": 1e-4},
        "loss_dict": {"water": loss, "molecules": loss},
        "optimizer": {"type": "Adam"},
        "training": {"data_dict": {name: {"training_data": {"systems": [str(tmp_path / name)], "batch_size": 1}}
                                   for name in ("water", "molecules")},
                     "model_prob": {"water": 0.7, "molecules": 0.3},
                     "numb_steps": numb_steps, "seed": 1, "disp_freq": 1, "save_freq": 100},
    }


def test_multitask_dataset_encoding_trains_every_head(tmp_path):
    config = parse_input(multitask_input(tmp_path, numb_steps=4), tmp_path)
    path = train(config, tmp_path, progress=False, plots=False)
    model = dpa3_ref.checkpoint.load_model(path)
    assert model.head_names == ["molecules", "water"]
    assert len(model.fittings) == 1 and len(model.descriptors) == 1  # one shared fitting: size does not grow
    # the one-hot index is the head's position in the sorted names
    np.testing.assert_array_equal(model.head("molecules").fitting.case_embd, [1.0, 0.0])
    np.testing.assert_array_equal(model.head("water").fitting.case_embd, [0.0, 1.0])
    # per-head energy offsets: the molecules' energies are shifted by 30 eV over 6 atoms
    counts = np.array([2.0, 4.0])  # O2H4
    shift = counts @ np.asarray(model.out_bias["molecules"]) - counts @ np.asarray(model.out_bias["water"])
    assert abs(shift - 30) < 3
    header = (tmp_path / "lcurve.out").read_text().splitlines()[0].split()
    assert "rmse_e_trn_molecules" in header and "rmse_f_trn_water" in header
    with pytest.raises(Dpa3Error, match="molecules"):
        dpa3_ref.load(path)
    water = dpa3_ref.load(path, head="water")
    assert np.isfinite(water.evaluate(np.random.default_rng(0).uniform(0, 3, (6, 3)), ["O", "O", "H", "H", "H", "H"],
                                      np.eye(3) * 5)["energy"])


def test_a_single_task_model_with_dataset_encoding_keeps_a_zero_one_hot(tmp_path):
    """A single-task fitting may have dim_case_embd > 0 (a branch of a multitask model has); it has no index,
    so its one-hot stays zeros, as in deepmd-kit, and training must not need one."""
    data = single_input(tmp_path, numb_steps=1)
    data["model"] = {**TINY_MODEL, "fitting_net": {**TINY_MODEL["fitting_net"], "dim_case_embd": 2}}
    path = train(parse_input(data, tmp_path), tmp_path, progress=False, plots=False)
    np.testing.assert_array_equal(dpa3_ref.load(path).model.fitting.case_embd, [0.0, 0.0])


def test_tasks_are_drawn_with_model_prob():
    """A chi-square test of 4000 draws against model_prob; false-alarm rate 1e-4 (and the draws are fixed by
    the seed, so the test is deterministic)."""
    probabilities = np.array([0.5, 0.3, 0.2])
    draws = [draw_head(["a", "b", "c"], probabilities, seed=11, step=step) for step in range(4000)]
    counts = np.array([draws.count(name) for name in "abc"])
    assert stats.chisquare(counts, 4000 * probabilities).pvalue > 1e-4
    assert draws == [draw_head(["a", "b", "c"], probabilities, seed=11, step=step) for step in range(4000)]


TWO_DEVICES = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import jax
    from dpa3_ref.inputs import parse_input
    from dpa3_ref.train import Trainer, fresh_model
    config = parse_input(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
    trainer = Trainer(config, Path(sys.argv[2]))
    trainer.start_from(fresh_model(config, trainer.data))
    losses = []
    for step in range(3):
        losses.append(trainer.run_step(step)[2]["rmse"])
    print(json.dumps({"devices": jax.device_count(), "mesh": trainer.mesh is not None, "losses": losses}))
""")


def test_two_devices_give_the_same_training_as_one(tmp_path):
    data = single_input(tmp_path, numb_steps=3)
    (tmp_path / "input.json").write_text(json.dumps(data))
    script = tmp_path / "steps.py"
    script.write_text(TWO_DEVICES)
    results = []
    for flags in ("", "--xla_force_host_platform_device_count=2"):
        environment = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()}
        run = subprocess.run([sys.executable, str(script), str(tmp_path / "input.json"), str(tmp_path)],
                             capture_output=True, text=True, env=environment, check=False)
        assert run.returncode == 0, run.stderr[-3000:]
        results.append(json.loads(run.stdout.strip().splitlines()[-1]))
    one, two = results
    assert one["devices"] == 1 and two["devices"] == 2 and two["mesh"]
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-12)


TWO_PROCESSES = textwrap.dedent("""
    import json, signal, sys
    from pathlib import Path
    import jax
    port, process, workdir = sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    try:  # CPU collectives between processes: gloo (JAX's default on CPU, made explicit)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process, initialization_timeout=60)
        jax.devices()
    except Exception as error:
        print(json.dumps({"unavailable": f"{type(error).__name__}: {error}"}))
        sys.exit(0)
    from dpa3_ref.inputs import parse_input
    from dpa3_ref.train import Trainer, TrainingInterrupted, fresh_model, summarise
    config = parse_input(json.loads(Path(sys.argv[1]).read_text()), workdir.parent)
    trainer = Trainer(config, workdir)
    trainer.start_from(fresh_model(config, trainer.data))
    losses, run_step = [], trainer.run_step
    def recording(step):
        head, learning_rate, metrics = run_step(step)
        losses.append(metrics["rmse"])
        if process == 1 and step == 2:  # a SIGTERM that reaches process 1 alone, during the last step
            trainer.request_stop(signal.SIGTERM, None)
        return head, learning_rate, metrics
    trainer.run_step = recording
    try:
        trainer.train(progress=False)
        stopped = None
    except TrainingInterrupted as stop:
        stopped = [stop.signum, stop.checkpoint.name, stop.step]
    summarise(trainer, workdir / "model.npz", 0.0, plots=True)
    print(json.dumps({"devices": jax.device_count(), "local": jax.local_device_count(), "losses": losses,
                      "stopped": stopped}))
""")


def test_two_processes_give_the_same_training_as_one(tmp_path):
    """Multi-host data parallelism: two processes joined by jax.distributed (one CPU device each, gloo
    collectives) train as one process does; only process 0 writes files; a signal to one process stops both
    after the same step."""
    data = single_input(tmp_path, numb_steps=3)
    data["training"]["training_data"]["systems"] = [str(write_system(tmp_path / "even", 4, seed=1))]  # one shape
    (tmp_path / "input.json").write_text(json.dumps(data))
    script = tmp_path / "process.py"
    script.write_text(TWO_PROCESSES)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environment = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}  # one device each
    workdirs = [tmp_path / f"process{i}" for i in range(2)]  # as on two hosts without a shared disk
    processes = []
    for i, workdir in enumerate(workdirs):
        workdir.mkdir()
        processes.append(subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "input.json"), str(port), str(i), str(workdir)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment))

    alone = tmp_path / "alone"  # the reference, one process on one device, computed here while they run
    alone.mkdir()
    losses, run_step = [], Trainer.run_step

    def recording(self, step):
        result = run_step(self, step)
        losses.append(result[2]["rmse"])
        return result

    Trainer.run_step = recording
    try:
        train(parse_input(data, tmp_path), alone, progress=False, plots=False)
        outputs = [process.communicate(timeout=150) for process in processes]
    finally:
        Trainer.run_step = run_step
        for process in processes:
            process.kill()  # only one still running after a failure
    results = []
    for process, (stdout, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    if any("unavailable" in result for result in results):
        pytest.skip(f"no cross-process CPU collectives here: {[r.get('unavailable') for r in results]}")

    assert jax.device_count() == 1 and all(r["devices"] == 2 and r["local"] == 1 for r in results)
    for result in results:
        np.testing.assert_allclose(result["losses"], losses, rtol=1e-12)
        assert result["stopped"] == [signal.SIGTERM, "model.ckpt-3.npz", 3]
    reference, checkpoint = np.load(alone / "model.ckpt-3.npz"), np.load(workdirs[0] / "model.ckpt-3.npz")
    names = [name for name in reference.files if name.startswith(("model/", "opt/"))]
    assert len(names) > 10
    for name in names:
        np.testing.assert_allclose(checkpoint[name], reference[name], rtol=1e-12, atol=1e-15, err_msg=name)
    assert (workdirs[0] / "lcurve.out").read_text() == (alone / "lcurve.out").read_text()
    written = {path.name for path in workdirs[0].iterdir()}
    assert written == {"lcurve.out", "model.ckpt-3.npz", "checkpoint", "model_best.npz", "lcurve.png", "parity.png"}
    assert not list(workdirs[1].iterdir())


def test_a_loss_that_is_no_longer_finite_stops_training_with_a_sentence(tmp_path):
    # The exponential switch with a smooth radius far below the cutoff overflows in float32 (exp(20/0.1 * 3)):
    # the energy is finite but its gradient, the forces, are NaN from the first step on.
    data = single_input(tmp_path, numb_steps=4)
    repflow = {**TINY_MODEL["descriptor"]["repflow"], "use_exp_switch": True, "e_rcut_smth": 0.1}
    data["model"] = {**TINY_MODEL, "descriptor": {**TINY_MODEL["descriptor"], "precision": "float32",
                                                  "repflow": repflow},
                     "fitting_net": {**TINY_MODEL["fitting_net"], "precision": "float32"}}
    with pytest.raises(Dpa3Error, match=r"training diverged at step 1: the loss of head 'Default' is nan "
                                        r"\(no checkpoint was written yet\)"):
        train(parse_input(data, tmp_path), tmp_path, progress=False, plots=False)
    assert not list(tmp_path.glob("model*.npz"))  # nothing of the diverged run is saved as a model


def test_a_training_checkpoint_is_a_model_file_for_every_command(tmp_path):
    # as deepmd-kit's `dp test -m model.ckpt.pt`: the last checkpoint holds the final model
    config = parse_input(single_input(tmp_path, numb_steps=3), tmp_path)
    train(config, tmp_path, progress=False, plots=False)
    final, checkpoint = arrays(tmp_path / "model.npz"), arrays(tmp_path / "model.ckpt-3.npz")
    assert final.keys() == checkpoint.keys()
    for name in final:
        np.testing.assert_array_equal(final[name], checkpoint[name], err_msg=name)
    with pytest.raises(Dpa3Error, match="not a dpa3-ref model file or training checkpoint"):
        dpa3_ref.checkpoint.load_model(tmp_path / "train" / "set.000" / "coord.npy")
