// Energy and forces of a DPA3 model exported by `dpa3 export` (ONNX contract v1), from Node.js.
//
//     node dpa3.mjs model.onnx structure.xyz [--threads N]     → JSON on stdout: energy, forces, virial
//
// Written from ../../README.md alone: it reads the file's metadata, builds the neighbour table by the
// selection rule (§3) and the reverse table (§4) itself, and runs onnxruntime-node. The structure is an
// extxyz file (Lattice="..." makes it periodic; pbc="F F F" or a plain xyz file is open).
// O(N² · images) neighbour search: fine for the few hundred atoms of an example.

import { readFileSync } from "node:fs";
import ort from "onnxruntime-node";

// ----------------------------------------------------------------------------- the file's metadata (§1)
// ModelProto.metadata_props is field 14, a repeated {key = 1, value = 2} message: read the protobuf wire
// format directly (onnxruntime-node does not expose custom metadata).
function readVarint(buffer, offset) {
  let value = 0n, shift = 0n, byte;
  do {
    byte = buffer[offset++];
    value |= BigInt(byte & 0x7f) << shift;
    shift += 7n;
  } while (byte & 0x80);
  return [value, offset];
}

function fields(buffer, start, end) {  // [fieldNumber, wireType, payload or value]
  const out = [];
  let offset = start;
  while (offset < end) {
    let tag, length;
    [tag, offset] = readVarint(buffer, offset);
    const field = Number(tag >> 3n), wire = Number(tag & 7n);
    if (wire === 0) { let v; [v, offset] = readVarint(buffer, offset); out.push([field, wire, v]); }
    else if (wire === 1) { offset += 8; }
    else if (wire === 5) { offset += 4; }
    else if (wire === 2) {
      [length, offset] = readVarint(buffer, offset);
      out.push([field, wire, buffer.subarray(offset, offset + Number(length))]);
      offset += Number(length);
    } else throw new Error(`unsupported protobuf wire type ${wire}`);
  }
  return out;
}

function readMetadata(path) {
  const buffer = readFileSync(path);
  const metadata = {};
  for (const [field, wire, payload] of fields(buffer, 0, buffer.length)) {
    if (field !== 14 || wire !== 2) continue;
    const entry = {};
    for (const [f, , value] of fields(payload, 0, payload.length)) entry[f] = Buffer.from(value).toString("utf8");
    metadata[entry[1]] = entry[2] ?? "";
  }
  if (metadata.dpa3_contract_version !== "1") {
    throw new Error(`${path} is not a DPA3 export of ONNX contract version 1`);
  }
  return {
    typeMap: JSON.parse(metadata.dpa3_type_map),
    eRcut: Number(metadata.dpa3_e_rcut), aRcut: Number(metadata.dpa3_a_rcut),
    eSel: Number(metadata.dpa3_e_sel), aSel: Number(metadata.dpa3_a_sel),
    excludeTypes: JSON.parse(metadata.dpa3_exclude_types),
    single: metadata.dpa3_precision === "float32",  // float32 + int32 inputs (§7), else float64 + int64
  };
}

// ----------------------------------------------------------------------------- extxyz
function readXyz(path) {
  const lines = readFileSync(path, "utf8").split("\n");
  const n = Number(lines[0].trim());
  const comment = lines[1];
  const lattice = /Lattice="([^"]*)"/.exec(comment);
  const pbc = /pbc="([^"]*)"/.exec(comment);
  const periodic = lattice !== null && (pbc === null || pbc[1].trim().split(/\s+/).every((p) => p === "T"));
  const cell = periodic ? [0, 1, 2].map((k) => lattice[1].trim().split(/\s+/).slice(3 * k, 3 * k + 3).map(Number)) : null;
  const elements = [], positions = [];
  for (let a = 0; a < n; a++) {
    const parts = lines[2 + a].trim().split(/\s+/);
    elements.push(parts[0]);
    positions.push(parts.slice(1, 4).map(Number));  // species first, then pos (ASE's column order)
  }
  return { elements, positions, cell };
}

// ----------------------------------------------------------------------------- the selection rule (§3)
const dot = (a, b) => a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
const cross = (a, b) => [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]];

function imageShifts(cell, cutoff, positions) {  // every S·cell that can bring an image within the cutoff
  if (cell === null) return [[0, 0, 0]];
  const volume = dot(cell[0], cross(cell[1], cell[2]));
  const reach = [0, 1, 2].map((k) => {
    const normal = cross(cell[(k + 1) % 3], cell[(k + 2) % 3]);  // / volume: the reciprocal vector b_k
    const fractions = positions.map((x) => dot(x, normal) / volume);  // positions need not be wrapped
    const span = Math.max(...fractions) - Math.min(...fractions);
    return Math.ceil(cutoff * Math.hypot(...normal) / Math.abs(volume) + span);  // cutoff / height + span
  });
  const shifts = [];
  for (let a = -reach[0]; a <= reach[0]; a++)
    for (let b = -reach[1]; b <= reach[1]; b++)
      for (let c = -reach[2]; c <= reach[2]; c++)
        shifts.push([0, 1, 2].map((x) => a * cell[0][x] + b * cell[1][x] + c * cell[2][x]));
  return shifts;
}

function modelInputs(structure, info) {
  const { positions, cell } = structure;
  const n = positions.length;
  const types = structure.elements.map((e, a) => {
    const t = info.typeMap.indexOf(e);
    if (t < 0) throw new Error(`atom ${a} is ${e}, which is not in the model's type map ${info.typeMap}`);
    return t;
  });
  const excluded = new Set(info.excludeTypes.flatMap(([a, b]) => [`${a},${b}`, `${b},${a}`]));
  const shifts = imageShifts(cell, info.eRcut, positions);
  const rows = [];  // per atom: kept neighbours {j, shift, d, rank, real}
  for (let i = 0; i < n; i++) {
    const found = [];
    for (const s of shifts) {
      for (let j = 0; j < n; j++) {
        // the same operations, in the same order, as the Python client (vesin): distances that differ in the
        // last bit can swap two neighbours at the a_sel or e_sel boundary, where the energy is not smooth
        const r = [0, 1, 2].map((x) => positions[j][x] - positions[i][x] + s[x]);
        const d = Math.sqrt(r[0] * r[0] + r[1] * r[1] + r[2] * r[2]);
        if (d <= info.eRcut && !(j === i && s.every((x) => x === 0))) {
          if (d < 1e-4) throw new Error(`atoms ${i} and ${j} are at the same position`);
          found.push({ j, shift: s, d });
        }
      }
    }
    found.sort((p, q) => p.d - q.d);  // nearest first (Array.sort is stable)
    rows.push(found.slice(0, info.eSel).map((p, rank) => ({ ...p, rank,
      real: !excluded.has(`${types[i]},${types[p.j]}`) })));
  }
  const width = Math.max(1, ...rows.flatMap((row) => row.filter((p) => p.real).map((p) => p.rank + 1)));
  const isAngle = (p) => p.real && p.rank < info.aSel && p.d < info.aRcut;
  const angleWidth = Math.max(1, ...rows.flatMap((row) => row.filter(isAngle).map((p) => p.rank + 1)));

  const neighbors = new BigInt64Array(n * width), neighborShift = new Float64Array(n * width * 3);
  const neighborMask = new Uint8Array(n * width), angleMask = new Uint8Array(n * angleWidth);
  const pointing = Array.from({ length: n }, () => []);  // §4: real cells pointing at each atom
  rows.forEach((row, i) => {
    for (const p of row) {
      if (!p.real || p.rank >= width) continue;
      const c = i * width + p.rank;
      neighbors[c] = BigInt(p.j);
      neighborShift.set(p.shift, 3 * c);
      neighborMask[c] = 1;
      if (isAngle(p)) angleMask[i * angleWidth + p.rank] = 1;
      pointing[p.j].push(c);
    }
  });
  const reverseWidth = Math.max(1, ...pointing.map((cells) => cells.length));
  const reverse = new BigInt64Array(n * reverseWidth).fill(-1n);
  pointing.forEach((cells, j) => cells.sort((a, b) => a - b).forEach((c, r) => { reverse[j * reverseWidth + r] = BigInt(c); }));

  const float = (data, shape) => info.single ? new ort.Tensor("float32", Float32Array.from(data), shape)
    : new ort.Tensor("float64", Float64Array.from(data), shape);
  const index = (data, shape) => info.single ? new ort.Tensor("int32", Int32Array.from(data, Number), shape)
    : new ort.Tensor("int64", BigInt64Array.from(data, BigInt), shape);
  return {
    positions: float(positions.flat(), [n, 3]),
    types: index(types, [n]),
    n_local: index([n], []),
    neighbors: index(neighbors, [n, width]),
    neighbor_shift: float(neighborShift, [n, width, 3]),
    neighbor_mask: new ort.Tensor("bool", neighborMask, [n, width]),
    angle_mask: new ort.Tensor("bool", angleMask, [n, angleWidth]),
    reverse_neighbors: index(reverse, [n, reverseWidth]),
  };
}

// ----------------------------------------------------------------------------- main
const [modelPath, structurePath, ...rest] = process.argv.slice(2);
if (!modelPath || !structurePath) {
  console.error("usage: node dpa3.mjs model.onnx structure.xyz [--threads N]");
  process.exit(2);
}
const threadsAt = rest.indexOf("--threads");
const options = { logSeverityLevel: 3, ...(threadsAt >= 0 ? { intraOpNumThreads: Number(rest[threadsAt + 1]) } : {}) };
try {
  const info = readMetadata(modelPath);
  const structure = readXyz(structurePath);
  const session = await ort.InferenceSession.create(modelPath, options);
  const out = await session.run(modelInputs(structure, info));
  const n = structure.positions.length;
  const forces = Array.from({ length: n }, (_, a) => Array.from(out.forces.data.slice(3 * a, 3 * a + 3)));
  const virial = [0, 1, 2].map((k) => Array.from(out.virial.data.slice(3 * k, 3 * k + 3)));
  console.log(JSON.stringify({ energy: out.energy.data[0], forces, virial }));
} catch (error) {
  console.error(`dpa3.mjs: error: ${error.message}`);
  process.exit(1);
}
