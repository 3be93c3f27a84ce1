#!/usr/bin/env python3
"""An fp32 copy of a bf16 checkpoint whose expert matrices are quantize-dequantized in a candidate
format, to measure a format's quality before building it (`expertflow score` on the copy against
the original; every product of an int8 value and an fp16 scale is exact in fp32).

  scripts/bench/fake_quant_experts.py MODEL_DIR OUT_DIR FORMAT

FORMAT: none (a plain fp32 copy: scores identical to the original), symG (int8 symmetric, groups
of G along the input dimension, fp16 scale rounded up, as Q8G), asymG (int8 asymmetric, fp16
scale rounded up and minimum rounded down), mseG (symmetric, the scale among 20 candidates from
max/127 down to 0.81 x max/127 with the least squared error in the group).
"""
import array
import json
import os
import shutil
import struct
import sys


def f16(x, up):
    """x rounded to fp16 towards +inf (up) or -inf."""
    h = struct.unpack("<e", struct.pack("<e", x))[0]
    if (up and h < x) or (not up and h > x):
        bits = struct.unpack("<H", struct.pack("<e", h))[0]
        bits += 1 if (h >= 0) == up else -1
        h = struct.unpack("<e", struct.pack("<H", bits))[0]
    return h


def sym(v, s):
    return [max(-127, min(127, round(x / s))) * s for x in v]


def quantize_group(v, kind):
    if kind == "asym":
        lo, hi = min(v), max(v)
        if hi == lo:
            return list(v)
        mn = f16(lo, up=False)
        s = f16((hi - mn) / 255, up=True)
        return [max(0, min(255, round((x - mn) / s))) * s + mn for x in v]
    m = max(abs(x) for x in v)
    if m == 0:
        return [0.0] * len(v)
    if kind == "sym":
        return sym(v, f16(m / 127, up=True))
    best = None
    for i in range(20):  # mse
        d = sym(v, f16(m * (1 - 0.01 * i) / 127, up=True))
        err = sum((a - b) ** 2 for a, b in zip(v, d))
        if best is None or err < best[0]:
            best = (err, d)
    return best[1]


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__.strip())
    src, out, fmt = sys.argv[1:4]
    kind = "".join(c for c in fmt if c.isalpha())
    if kind not in ("none", "sym", "asym", "mse") or (kind != "none" and not fmt[len(kind):].isdigit()):
        sys.exit(f"unknown format {fmt!r}: none, symG, asymG or mseG")
    group = int(fmt[len(kind):]) if kind != "none" else 0
    os.makedirs(out, exist_ok=True)
    for f in os.listdir(src):
        if f != "model.safetensors":
            shutil.copy(os.path.join(src, f), out)
    raw = open(os.path.join(src, "model.safetensors"), "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    new_header, blobs, offset = {}, [], 0
    for name, t in header.items():
        if name == "__metadata__":
            new_header[name] = t
            continue
        a, b = t["data_offsets"]
        data = raw[8 + n + a:8 + n + b]
        dtype = t["dtype"]
        if ".experts." in name:
            if dtype != "BF16":
                sys.exit(f"{name}: {dtype}, expected BF16")
            halves = array.array("H")
            halves.frombytes(data)
            vals = [struct.unpack("<f", struct.pack("<I", h << 16))[0] for h in halves]
            rows, cols = t["shape"]
            if kind != "none":
                if cols % group:
                    sys.exit(f"{name}: {cols} columns, not a multiple of {group}")
                q = []
                for r in range(rows):
                    row = vals[r * cols:(r + 1) * cols]
                    for c in range(0, cols, group):
                        q += quantize_group(row[c:c + group], kind)
                vals = q
            data, dtype = array.array("f", vals).tobytes(), "F32"
        new_header[name] = {"dtype": dtype, "shape": t["shape"], "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    encoded = json.dumps(new_header).encode()
    encoded += b" " * ((8 - len(encoded) % 8) % 8)
    with open(os.path.join(out, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for blob in blobs:
            f.write(blob)


if __name__ == "__main__":
    main()
