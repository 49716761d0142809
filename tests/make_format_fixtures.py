"""Fixtures for tests/formats.rs, made by the reference Python packages.

Run by hand from the repository root with the reference environment
(numpy, torch, gguf 0.19, safetensors):

    /opt/refenv/bin/python tests/make_format_fixtures.py

writes tests/data/formats/:

    quants.gguf          one tensor of every type lift dequantizes (and one
                         IQ2_XXS, which it does not), written by gguf.GGUFWriter,
                         plus metadata of every scalar and array type
    tensors.safetensors  F32/F16/BF16 tensors (and an I64 one lift cannot
                         read), written by safetensors.torch.save_file
    expected.json        what the reference readers see: tensor names, dims,
                         types, absolute data offsets, section offsets (from
                         gguf.GGUFReader), the metadata as written, and where
                         each tensor's expected values lie in expected.f32
    expected.f32         the expected values, little-endian f32: for GGUF
                         gguf.quants.dequantize of the bytes GGUFReader reads
                         back; for safetensors torch's .float()

The legacy quants (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) and BF16 are quantized from
random data with gguf.quants.quantize. gguf-py has no quantizer for the
K-quants, so their blocks are random bytes with finite f16 scales: every bit
of the layout is exercised and gguf.quants.dequantize still defines the
values. gguf-py has no Q8_K dequantizer either; its expected values are
d * q computed here with numpy.

The output is deterministic (fixed seeds), except that the safetensors
library orders the __metadata__ keys of its header differently from run to
run. Rerun only when changing the fixtures.

    /opt/refenv/bin/python tests/make_format_fixtures.py --check-written DIR

reads DIR/written.gguf and DIR/written.safetensors, which
`cargo test --release --test formats` writes with lift's writers into
target/tmp/formats, with gguf.GGUFReader and safetensors.torch.load_file, and
checks every value against what the Rust test put there.
"""

import json
import struct
import sys
from pathlib import Path

import numpy as np
import torch
import gguf
from gguf import GGMLQuantizationType as Q, GGUFValueType as V
from safetensors import safe_open
from safetensors.torch import load_file, save_file

OUT = Path(__file__).parent / "data" / "formats"

# key -> (value type, element type for arrays, value). Nested arrays are
# arrays of arrays whose inner type gguf-py infers (int -> INT32, str -> STRING).
METADATA = {
    "test.u8": (V.UINT8, None, 200),
    "test.i8": (V.INT8, None, -100),
    "test.u16": (V.UINT16, None, 60000),
    "test.i16": (V.INT16, None, -30000),
    "test.u32": (V.UINT32, None, 4000000000),
    "test.i32": (V.INT32, None, -2000000000),
    "test.u64": (V.UINT64, None, 2**63 + 12345),
    "test.i64": (V.INT64, None, -(2**62) - 7),
    "test.f32": (V.FLOAT32, None, 0.1),
    "test.f64": (V.FLOAT64, None, 0.1),
    "test.bool_true": (V.BOOL, None, True),
    "test.bool_false": (V.BOOL, None, False),
    "test.string": (V.STRING, None, "héllo wörld ✓"),
    "test.empty_string": (V.STRING, None, ""),
    "test.arr_u8": (V.ARRAY, V.UINT8, [0, 255, 7]),
    "test.arr_i16": (V.ARRAY, V.INT16, [-32768, 32767]),
    "test.arr_u32": (V.ARRAY, V.UINT32, [1, 4294967295]),
    "test.arr_i32": (V.ARRAY, V.INT32, [-1, 0, 2147483647]),
    "test.arr_u64": (V.ARRAY, V.UINT64, [2**64 - 1]),
    "test.arr_f32": (V.ARRAY, V.FLOAT32, [0.5, -1.25, 3e-8]),
    "test.arr_f64": (V.ARRAY, V.FLOAT64, [1e300, -2.5]),
    "test.arr_bool": (V.ARRAY, V.BOOL, [True, False, True]),
    "test.arr_string": (V.ARRAY, V.STRING, ["a", "", "ü€"]),
    "test.nested": (V.ARRAY, V.ARRAY, [[1, 2, 3], [-4]]),
    "test.nested_strings": (V.ARRAY, V.ARRAY, [["x"], ["y", "z"]]),
    "llama.block_count": (V.UINT32, None, 2),
    "llama.rope.freq_base": (V.FLOAT32, None, 10000.0),
}


def as_written(vtype, value):
    """The value as the file holds it. Floats go to JSON as repr strings (the
    shortest decimal that round-trips), rounded to f32 where stored so, so
    that the Rust test can parse them exactly with str::parse."""
    if vtype == V.FLOAT32:
        return repr(float(np.float32(value)))
    if vtype == V.FLOAT64:
        return repr(float(value))
    return value


def metadata_json(vtype, sub, value):
    """{"type": ..., "value": ...} for expected.json, arrays with their
    element type and nested arrays as nested lists."""
    if vtype != V.ARRAY:
        return {"type": vtype.name, "value": as_written(vtype, value)}
    if sub == V.ARRAY:
        inner = V.STRING if isinstance(value[0][0], str) else V.INT32
        return {"type": "ARRAY", "elem": "ARRAY", "value": [metadata_json(V.ARRAY, inner, v) for v in value]}
    return {"type": "ARRAY", "elem": sub.name, "value": [as_written(sub, v) for v in value]}


def random_k_blocks(rng, qtype, n_blocks):
    """Random blocks of a K-quant with finite, moderate f16 scales at the
    offsets ggml's block structs put them."""
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    f16_fields = {Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}
    for off in f16_fields.get(qtype, []):
        scale = (rng.standard_normal(n_blocks) * 0.01).astype(np.float16)
        blocks[:, off:off + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    if qtype == Q.Q8_K:
        d = (rng.standard_normal(n_blocks) * 0.01).astype(np.float32)
        blocks[:, 0:4] = d.view(np.uint8).reshape(n_blocks, 4)
    return blocks


def q8_k_dequantize(raw):
    blocks = raw.reshape(-1, 292)
    d = blocks[:, 0:4].copy().view(np.float32)
    q = blocks[:, 4:260].copy().view(np.int8).astype(np.float32)
    return (d * q).reshape(-1)


def make_gguf(rng, expected_values, manifest):
    path = OUT / "quants.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    for key, (vtype, sub, value) in METADATA.items():
        w.add_key_value(key, value, vtype, sub_type=sub)

    # Rows of 256 values (a multiple of every block size), a few per tensor,
    # with a wide spread of magnitudes; one all-zero block tests the d = 0 path.
    data = (rng.standard_normal((4, 256)) * np.array([[0.01], [0.1], [1.0], [30.0]])).astype(np.float32)
    data[0, :32] = 0.0
    w.add_tensor("f32", data[:3, :64].copy())
    w.add_tensor("f32_3d", rng.standard_normal((2, 3, 32)).astype(np.float32))
    w.add_tensor("f16", data[:, :64].astype(np.float16))
    w.add_tensor("bf16", gguf.quants.quantize(data[:, :64], Q.BF16), raw_dtype=Q.BF16)
    for qtype in [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]:
        w.add_tensor(qtype.name.lower(), gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    # A 3-d quantized tensor: dims [64, 3, 2] in ggml order.
    data_3d = rng.standard_normal((2, 3, 64)).astype(np.float32)
    w.add_tensor("q8_0_3d", gguf.quants.quantize(data_3d, Q.Q8_0), raw_dtype=Q.Q8_0)
    for qtype in [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_K]:
        # 3 rows of 2 super-blocks each.
        blocks = random_k_blocks(rng, qtype, 6)
        w.add_tensor(qtype.name.lower(), blocks.reshape(3, -1), raw_dtype=qtype)
    w.add_tensor("iq2_xxs", rng.integers(0, 256, size=(1, 66), dtype=np.uint8), raw_dtype=Q.IQ2_XXS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    # Everything below comes from reading the file back with gguf-py.
    r = gguf.GGUFReader(str(path))
    for key, (vtype, sub, value) in METADATA.items():
        f = r.fields[key]
        assert f.types[0] == vtype and (sub is None or f.types[1] == sub), key
        if sub != V.ARRAY:
            want = [as_written(sub, v) for v in value] if sub else as_written(vtype, value)
            got = f.contents()
            if vtype == V.FLOAT32 or sub == V.FLOAT32 or vtype == V.FLOAT64 or sub == V.FLOAT64:
                got = [repr(float(x)) for x in got] if sub else repr(float(got))
            assert got == want, (key, got, want)
    tensors = []
    for t in r.tensors:
        entry = {
            "name": t.name,
            "type": t.tensor_type.name,
            "dims": [int(d) for d in t.shape],
            "data_offset": int(t.data_offset),
            "n_bytes": int(t.n_bytes),
            "expected": None,
        }
        raw = np.asarray(t.data)
        if t.tensor_type == Q.Q8_K:
            values = q8_k_dequantize(raw.view(np.uint8))
        elif t.tensor_type != Q.IQ2_XXS:
            values = gguf.quants.dequantize(raw, t.tensor_type).reshape(-1)
        else:
            values = None
        if values is not None:
            entry["expected"] = add_expected(expected_values, values)
        tensors.append(entry)
    manifest["gguf"] = {
        "file": path.name,
        "version": int(r.fields["GGUF.version"].contents()),
        "tensor_info_start": int(r.tensors[0].field.offset),
        "data_start": int(r.data_offset),
        "alignment": int(r.alignment),
        "tensors": tensors,
        "metadata": {"general.architecture": {"type": "STRING", "value": "llama"}}
        | {k: metadata_json(*v) for k, v in METADATA.items()},
    }


def make_safetensors(rng, expected_values, manifest):
    path = OUT / "tensors.safetensors"
    g = torch.Generator().manual_seed(1)
    tensors = {
        "f32": torch.randn(3, 5, generator=g),
        "f16": (torch.randn(4, 8, generator=g) * 100).half(),
        "bf16": torch.randn(2, 3, 4, generator=g).bfloat16(),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 4),
        "ids": torch.arange(6, dtype=torch.int64),
    }
    metadata = {"format": "pt", "note": "lift fixture ✓"}
    save_file(tensors, str(path), metadata=metadata)
    # The dtype names as the file's JSON header spells them.
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    entries = []
    for name, t in tensors.items():
        entry = {"name": name, "dtype": header[name]["dtype"], "shape": list(t.shape), "expected": None}
        if t.is_floating_point():
            entry["expected"] = add_expected(expected_values, t.float().numpy().reshape(-1))
        entries.append(entry)
    manifest["safetensors"] = {"file": path.name, "metadata": metadata, "tensors": entries}


def add_expected(expected_values, values):
    """Appends values to expected.f32; returns [offset, count] in values."""
    offset = sum(len(v) for v in expected_values)
    expected_values.append(np.asarray(values, dtype=np.float32))
    return [offset, len(values)]


def make_fixtures():
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20240613)
    expected_values, manifest = [], {}
    make_gguf(rng, expected_values, manifest)
    make_safetensors(rng, expected_values, manifest)
    np.concatenate(expected_values).astype("<f4").tofile(OUT / "expected.f32")
    (OUT / "expected.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"wrote {OUT} ({total} bytes)")


# --- checking lift's writers ------------------------------------------------


def written_values(n):
    """The values tests/formats.rs writes: ((i * 37) % 101 - 50) / 7 in f32."""
    i = np.arange(n, dtype=np.int64)
    return ((i * 37) % 101 - 50).astype(np.float32) / np.float32(7.0)


def check_written(dir):
    dir = Path(dir)
    r = gguf.GGUFReader(str(dir / "written.gguf"))
    fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    expected_meta = {
        "general.alignment": ([V.UINT32], 32),
        "general.architecture": ([V.STRING], "llama"),
        "lift.u8": ([V.UINT8], 7),
        "lift.i8": ([V.INT8], -7),
        "lift.u16": ([V.UINT16], 65535),
        "lift.i16": ([V.INT16], -32768),
        "lift.u32": ([V.UINT32], 4294967295),
        "lift.i32": ([V.INT32], -5),
        "lift.u64": ([V.UINT64], 2**64 - 1),
        "lift.i64": ([V.INT64], -(2**63)),
        "lift.f32": ([V.FLOAT32], float(np.float32(0.1))),
        "lift.f64": ([V.FLOAT64], 0.1),
        "lift.bool": ([V.BOOL], True),
        "lift.string": ([V.STRING], "lift ✓"),
        "lift.tokens": ([V.ARRAY, V.STRING], ["<s>", "</s>", "Ġthe"]),
        "lift.scores": ([V.ARRAY, V.FLOAT32], [0.0, -1.5]),
        "lift.token_type": ([V.ARRAY, V.INT32], [1, 3, 1]),
        # gguf-py records no element type for an empty array.
        "lift.empty": ([V.ARRAY], []),
        # gguf-py flattens nested arrays in contents().
        "lift.nested": ([V.ARRAY, V.ARRAY, V.INT32], [1, 2, 3]),
    }
    assert list(fields) == list(expected_meta), (list(fields), list(expected_meta))
    for key, (types, value) in expected_meta.items():
        f = fields[key]
        assert f.types == types, (key, f.types, types)
        assert f.contents() == value, (key, f.contents(), value)
    assert r.alignment == 32
    shapes = {"w.f32": [8, 3], "w.f16": [16, 2, 2], "b": [5]}
    types = {"w.f32": Q.F32, "w.f16": Q.F16, "b": Q.F32}
    assert [t.name for t in r.tensors] == list(shapes)
    for t in r.tensors:
        assert list(t.shape) == shapes[t.name] and t.tensor_type == types[t.name], t.name
        assert t.data_offset % 32 == 0, t.name
        values = written_values(t.n_elements)
        if t.tensor_type == Q.F16:
            got = np.asarray(t.data).reshape(-1).view(np.uint16)
            want = values.astype(np.float16).view(np.uint16)
        else:
            got = np.asarray(t.data).reshape(-1).view(np.uint32)
            want = values.view(np.uint32)
        assert np.array_equal(got, want), t.name
    print(f"{dir / 'written.gguf'}: gguf.GGUFReader reads every metadata value and tensor as written")

    path = dir / "written.safetensors"
    loaded = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "writer": "lift"}, f.metadata()
    assert sorted(loaded) == ["a.f32", "b.bf16", "c.f32"], sorted(loaded)
    want = {
        "a.f32": torch.from_numpy(written_values(12)).reshape(3, 4),
        "b.bf16": torch.from_numpy(written_values(10)).reshape(2, 5).bfloat16(),
        "c.f32": torch.from_numpy(written_values(3)),
    }
    for name, t in want.items():
        got = loaded[name]
        assert got.dtype == t.dtype and got.shape == t.shape, name
        assert torch.equal(got, t), name
    (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert header_len % 8 == 0
    print(f"{path}: safetensors.torch.load_file reads every tensor and the metadata as written")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--check-written":
        check_written(sys.argv[2])
    elif len(sys.argv) == 1:
        make_fixtures()
    else:
        sys.exit(__doc__)
