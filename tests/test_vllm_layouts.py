"""KV caches exactly as vLLM 0.32 builds them (its own KVCacheLayout / compute_layout_strides /
create_kv_cache_views, through get_kv_cache_config_from_groups and allocate_kv_cache), described by kvbm's
KVLayout and moved byte-exact by the transfer code; the committed descriptions the GPU proof replays.

Tests that build caches with vllm skip where vllm is not installed (the device machine); the replay tests run
everywhere.
"""

import json
import random

import pytest
import torch

from kvbm.mechanism import BlockMove, DiskTier, HostTier, KVLayout, OffloadJob, OnboardJob, SlotCopy, TransferEngine
from kvbm.mechanism import fileio
from kvbm.mechanism.cuda_copy import FlatRows
from kvbm.mechanism.engine_views import DESCRIPTIONS, load_descriptions, replay
from kvbm.mechanism.transfer import copy_g1_to_g2, copy_g2_to_g1
from kvbm.policy import Tier

try:
    import vllm  # noqa: F401

    HAVE_VLLM = True
except ImportError:
    HAVE_VLLM = False

needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="needs vllm (installed on the CPU machine, not on the device)")
ACCEPTED = ["LBHNC", "LBNHC", "BLHNC", "BLNHC"]
REFUSED = ["LHBNC", "BHLNC"]
GEO = {"num_layers": 3, "num_kv_heads": 2, "head_size": 32}


def vllm_caches(layout_name, num_blocks=24, block_size=16):
    from vllm_layouts import vllm_kv_caches

    config, views = vllm_kv_caches(layout_name, num_blocks=num_blocks, block_size=block_size, **GEO)
    raw = next(iter(views.values())).untyped_storage()
    g = torch.Generator().manual_seed(sum(map(ord, layout_name)))
    buf = torch.empty(0, dtype=torch.int8).set_(raw)
    buf.copy_(torch.randint(-128, 127, buf.shape, generator=g, dtype=torch.int8))
    return config, views, buf


def block_bytes(layout, block_id):
    return torch.stack([seg[block_id] for seg in layout.segments]).clone()


@needs_vllm
def test_committed_descriptions_are_what_this_vllm_builds():
    from vllm_layouts import generate

    committed = json.loads(DESCRIPTIONS.read_text())
    assert committed == json.loads(json.dumps(generate())), (
        "vLLM's KV layout changed: regenerate with .venv/bin/python tests/vllm_layouts.py and re-run the GPU proof")
    assert committed["gpu_default_layout"] == "LBNHC"


@needs_vllm
@pytest.mark.parametrize("layout_name", ACCEPTED)
def test_segments_are_vllms_pages(layout_name):
    """Segment (layer l, block b) is the page at offset + l * layer_stride + b * block_stride, byte for byte."""
    config, views, buf = vllm_caches(layout_name)
    (tensor,) = config.kv_cache_tensors
    layout = KVLayout.from_layers(views, KVLayout.infer_block_dim(next(iter(views.values())), config.num_blocks))
    page = config.kv_cache_groups[0].kv_cache_spec.page_size_bytes
    assert (layout.num_segments, layout.segment_bytes) == (GEO["num_layers"], page)
    raw = buf.view(torch.uint8)
    for l, seg in enumerate(layout.segments):
        for b in (0, 7, config.num_blocks - 1):
            start = tensor.offset + l * tensor.layer_stride + b * tensor.block_stride
            assert torch.equal(seg[b].view(torch.uint8), raw[start:start + page])
    assert FlatRows.of(layout) is not None  # one gather/scatter kernel on a GPU
    # the permuted layouts' pages hold other bytes than the plain ones: their fingerprints differ
    plain = layout_name in ("LBHNC", "BLHNC")
    assert (layout.order == tuple(range(4))) == plain


@needs_vllm
@pytest.mark.parametrize("layout_name", REFUSED)
def test_layouts_with_split_pages_are_refused(layout_name):
    _, views, _ = vllm_caches(layout_name)
    with pytest.raises(ValueError, match="not contiguous within a block"):
        KVLayout.from_layers(views, 0)


@needs_vllm
@pytest.mark.parametrize("layout_name", ACCEPTED)
@pytest.mark.parametrize("block_major", [False, True], ids=["layer_major_host", "block_major_host"])
def test_copy_functions_round_trip_on_vllm_views(layout_name, block_major):
    config, views, _ = vllm_caches(layout_name)
    layout = KVLayout.from_layers(views, 0)
    host = HostTier(10, layout.num_segments, layout.segment_words, layout.word, pin=False, block_major=block_major)
    rng = random.Random(3)
    src = rng.sample(range(config.num_blocks), 8)
    dst = rng.sample([b for b in range(config.num_blocks) if b not in src], 8)
    slots = [0, 1, 2, 5, 6, 9, 4, 3]
    saved = {b: block_bytes(layout, b) for b in src}
    copy_g1_to_g2(layout, host, src, slots)
    untouched = {b: block_bytes(layout, b) for b in range(config.num_blocks) if b not in dst}
    copy_g2_to_g1(layout, host, dst, slots)
    for s, d in zip(src, dst):
        assert torch.equal(block_bytes(layout, d), saved[s])
    for b, want in untouched.items():
        assert torch.equal(block_bytes(layout, b), want)


@needs_vllm
@pytest.mark.parametrize("layout_name", ["LBNHC", "BLHNC"])
def test_transfer_engine_g1_g2_g3_g1_on_vllm_views(layout_name, tmp_path):
    config, views, _ = vllm_caches(layout_name, num_blocks=32)
    layout = KVLayout.from_layers(views, 0)
    host = HostTier.for_layout(layout, 8, pin=False)
    disk = DiskTier.create(tmp_path, 8, layout.block_bytes, layout.fingerprint(model="t"),
                           direct=fileio.probe_o_direct(tmp_path) is None)
    engine = TransferEngine(layout, host, disk)
    src = [3, 17, 5, 30, 8, 11, 2, 25]
    saved = {b: block_bytes(layout, b) for b in src}
    engine.submit_offload(OffloadJob("s", stores=[BlockMove(b, b, i) for i, b in enumerate(src)]))
    engine.submit_offload(OffloadJob("c", cascades=[SlotCopy(b, i, i) for i, b in enumerate(src)]))
    assert engine.wait(30)
    dst = [31, 0, 1, 4, 6, 7, 9, 10]
    loads = [BlockMove(b, d, i, Tier.G2 if i < 4 else Tier.G3) for i, (b, d) in enumerate(zip(src, dst))]
    engine.submit_onboard(OnboardJob("l", loads=loads))
    assert engine.wait(30)
    assert all(r.ok for r in engine.get_finished())
    for b, d in zip(src, dst):
        assert torch.equal(block_bytes(layout, d), saved[b])
    engine.close()


@needs_vllm
@pytest.mark.parametrize("layout_name", ACCEPTED)
def test_replay_rebuilds_vllms_views(layout_name):
    from vllm_layouts import describe, vllm_kv_caches

    desc = describe("t", layout_name, num_blocks=24, block_size=16, **GEO)
    _, views = vllm_kv_caches(layout_name, num_blocks=24, block_size=16, **GEO)
    _, replayed = replay(desc, "cpu")
    for name, v in views.items():
        r = replayed[name]
        assert (r.shape, r.stride(), r.storage_offset(), r.dtype) == (v.shape, v.stride(), v.storage_offset(), v.dtype)


def test_committed_descriptions_replay_without_vllm():
    """What the device machine does: rebuild on the meta device (no memory), describe with KVLayout."""
    descs = load_descriptions()
    assert {d["layout"] for d in descs.values()} >= {"LBNHC", "BLHNC"}
    for d in descs.values():
        raw = torch.empty(d["size"], dtype=torch.int8, device="meta")
        _, views = replay(d, raw=raw)
        layout = KVLayout.from_layers(views, 0)
        assert layout.num_segments == d["num_layers"]
        assert layout.block_bytes == d["num_layers"] * d["num_kv_heads"] * d["block_size"] * 2 * d["head_size"] * 2
    bad = dict(next(iter(descs.values())))
    bad["views"] = [dict(v, stride=[1, 1, 1, 1]) for v in bad["views"]]
    with pytest.raises(ValueError, match="differs from vLLM's"):
        replay(bad, raw=torch.empty(bad["size"], dtype=torch.int8, device="meta"))
