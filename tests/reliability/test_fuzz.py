"""Issue 5, fuzzing: random bytes and random valid-looking headers never escape as anything but
CifarkitError from the image and checkpoint loaders."""
import io
import json
import struct
import zipfile

from hypothesis import HealthCheck, given, settings, strategies as st

from cifarkit import CifarkitError
from cifarkit.checkpoint import load_checkpoint
from cifarkit.data import read_image

HEADERS = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", b"GIF89a", b"BM",
           b"RIFF\x00\x00\x00\x00WEBP", b"II*\x00", b"MM\x00*", b"P6\n32 32\n255\n", b"PK\x03\x04",
           b"\x80\x02", b"\x80\x04\x95"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.sampled_from(HEADERS), body=st.binary(max_size=3000))
def test_image_loader_fuzz(tmp_path, header, body):
    p = tmp_path / "fuzz.png"
    p.write_bytes(header + body)
    try:
        arr = read_image(p, 32)
        assert arr.shape == (32, 32, 3)
    except CifarkitError as exc:
        assert "\n" not in str(exc)


def _torch_zip(pkl: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


def _safetensors(header: bytes, body: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + body


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["raw", "header", "torch_zip", "safetensors", "safetensors_json"]),
       header=st.sampled_from(HEADERS), body=st.binary(max_size=2000),
       meta=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=4))
def test_checkpoint_loader_fuzz(tmp_path, kind, header, body, meta):
    p = tmp_path / "fuzz.ckpt"
    data = {"raw": body, "header": header + body, "torch_zip": _torch_zip(b"\x80\x02" + body),
            "safetensors": _safetensors(b"{" + body, b""),
            "safetensors_json": _safetensors(json.dumps({"w": {"dtype": "F32", "shape": [2],
                                                               "data_offsets": [0, 8]},
                                                         "__metadata__": meta}).encode(), body)}[kind]
    p.write_bytes(data)
    try:
        load_checkpoint(p, model="tudui").build_model()
    except CifarkitError as exc:
        assert "\n" not in str(exc)
