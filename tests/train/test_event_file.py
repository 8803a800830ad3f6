"""The hand-encoded event records parse as TensorBoard's own protos (tensorboardX's copies of them, the
reference here), with valid TFRecord checksums."""
import io
import struct

import numpy as np
from hypothesis import given, strategies as st
from tensorboardX.crc32c import crc32c
from tensorboardX.proto import event_pb2

from jaxcl.train import event_file


def _parse(data: bytes):
    def masked(b):
        c = crc32c(b)
        return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    (length,) = struct.unpack("<Q", data[:8])
    assert struct.unpack("<I", data[8:12])[0] == masked(data[:8])
    payload = data[12:12 + length]
    assert struct.unpack("<I", data[12 + length:16 + length])[0] == masked(payload)
    assert len(data) == 16 + length
    return event_pb2.Event.FromString(payload)


@given(step=st.integers(0, 2**62), tags=st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=4),
       value=st.floats(width=32, allow_nan=False), wall_time=st.floats(0, 2e9), restart=st.booleans())
def test_scalar_events_parse_as_tensorboard_events(step, tags, value, wall_time, restart):
    values = tuple(event_file.scalar(t, value) for t in tags)
    parsed = _parse(event_file.record(event_file.event(step, values=() if restart else values, restart=restart,
                                                       wall_time=wall_time)))
    assert parsed.step == step and parsed.wall_time == wall_time
    if restart:
        assert parsed.session_log.status == parsed.session_log.START and not parsed.HasField("summary")
    else:
        assert [v.tag for v in parsed.summary.value] == tags
        assert [v.simple_value for v in parsed.summary.value] == [np.float32(value)] * len(tags)


def test_the_file_starts_with_its_version_and_holds_a_png_image(tmp_path):
    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(np.arange(5 * 7 * 4, dtype=np.uint8).reshape(5, 7, 4)).save(png, format="PNG")
    f = event_file.EventFile(str(tmp_path), suffix=".x")
    f.write(event_file.event(3, values=(event_file.png_image("m", png.getvalue()),)))
    f.close()
    data = open(f.path, "rb").read()
    first_length = struct.unpack("<Q", data[:8])[0]
    header, image = _parse(data[:16 + first_length]), _parse(data[16 + first_length:])
    assert header.file_version == "brain.Event:2" and f.path.endswith(".x") and "events.out.tfevents." in f.path
    value = image.summary.value[0]
    assert (image.step, value.tag, value.image.height, value.image.width) == (3, "m", 5, 7)
    assert value.image.encoded_image_string == png.getvalue()
