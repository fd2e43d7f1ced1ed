"""The SRCID network: construction errors, code ranges, determinism and batch invariance."""

import pytest
import torch
from pydantic import ValidationError

from srcid.model import SRCID, ModalitySpec, SRCIDConfig
from srcid.training.step import OptimConfig, TrainStep, WarmStartConfig

SMALL = dict(
    modalities={
        "audio": ModalitySpec(shape=(20,)),
        "video": ModalitySpec(shape=(3, 3, 4)),
        "text": ModalitySpec(shape=(12,), masked=True),
    },
    hidden=32,
    heads=4,
    ff=64,
    codebook_size=24,
)


def _batch(B, g):
    return {
        "audio": torch.randn(B, 10, 20, generator=g),
        "video": torch.randn(B, 10, 3, 3, 4, generator=g),
        "text": torch.randn(B, 10, 12, generator=g),
        "text_mask": torch.arange(10).expand(B, 10) < torch.randint(3, 11, (B, 1), generator=g),
    }


@pytest.fixture(scope="module", params=["vq", "rvq3", "fsq"])
def trained(request):
    torch.manual_seed(0)
    kw = dict(SMALL, quantizer=request.param)
    if request.param == "fsq":
        kw.update(codebook_size=24, fsq_levels=(4, 3, 2))
    model = SRCID(SRCIDConfig(**kw))
    step = TrainStep(model, OptimConfig(), WarmStartConfig(force_step=2))
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        step.step(_batch(16, g))
    return model.eval()


def test_codes_in_range_for_each_layer_and_deterministic(trained):
    batch = _batch(9, torch.Generator().manual_seed(2))
    for m in trained.modalities:
        mask = batch.get(f"{m}_mask")
        a = trained.encode(m, batch[m], mask)
        b = trained.encode(m, batch[m], mask)
        for layer in ("layer1", "layer2"):
            assert a[layer].shape == (9, 10) and a[layer].dtype == torch.long
            assert a[layer].min() >= 0 and a[layer].max() < 24
            assert torch.equal(a[layer], b[layer])
        assert a["embedding"].shape == (9, 64)
        assert torch.allclose(a["embedding"].norm(dim=-1), torch.ones(9), atol=1e-5)


def test_batch_invariance_one_at_a_time_equals_one_batch(trained):
    batch = _batch(7, torch.Generator().manual_seed(3))
    for m in trained.modalities:
        mask = batch.get(f"{m}_mask")
        full = trained.encode(m, batch[m], mask)
        for i in range(7):
            one = trained.encode(m, batch[m][i : i + 1], None if mask is None else mask[i : i + 1])
            assert torch.equal(one["layer1"][0], full["layer1"][i])
            assert torch.equal(one["layer2"][0], full["layer2"][i])
            assert torch.allclose(one["embedding"][0], full["embedding"][i], atol=1e-5)


def test_masked_steps_do_not_change_codes_of_valid_steps(trained):
    batch = _batch(4, torch.Generator().manual_seed(4))
    mask = torch.ones(4, 10, dtype=torch.bool)
    mask[:, 6:] = False
    a = trained.encode("text", batch["text"], mask)
    garbage = batch["text"].clone()
    garbage[:, 6:] = 1e3
    b = trained.encode("text", garbage, mask)
    assert torch.equal(a["layer1"][:, :6], b["layer1"][:, :6])
    assert torch.allclose(a["embedding"], b["embedding"], atol=1e-5)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(modalities={"audio": ModalitySpec(shape=(4,)), "smell": ModalitySpec(shape=(4,))}), "unknown modality"),
        (dict(modalities={"audio": ModalitySpec(shape=(4,))}), "two or three"),
        (dict(codebook_size=0), "greater than 0"),
        (dict(hidden=30, heads=4), "divisible"),
        (dict(quantizer="fsq", codebook_size=400, fsq_levels=(5, 5, 4)), "fsq_levels"),
        (dict(quantizer="pq"), "quantizer"),
        (dict(cpc_horizon=10), "cpc_horizon"),
    ],
)
def test_bad_config_raises_clear_error_at_construction(bad, message):
    with pytest.raises(ValidationError, match=message):
        SRCIDConfig(**bad)


def test_bad_feature_shape_is_a_clear_error():
    model = SRCID(SRCIDConfig(**SMALL)).eval()
    with pytest.raises(ValueError, match=r"audio features have shape \(2, 10, 21\), expected \[B, 10, 20\]"):
        model.encode("audio", torch.randn(2, 10, 21))
    with pytest.raises(ValueError, match="unknown modality"):
        model.encode("smell", torch.randn(2, 10, 20))
    with pytest.raises(ValueError, match="no features for"):
        model({"audio": torch.randn(2, 10, 20)})


def test_amp_step_runs_in_bfloat16_with_finite_losses():
    torch.manual_seed(0)
    model = SRCID(SRCIDConfig(**SMALL))
    step = TrainStep(model, OptimConfig(amp=True), WarmStartConfig(force_step=0))
    figures = step.step(_batch(8, torch.Generator().manual_seed(5)))
    assert torch.isfinite(figures["loss"]) and float(figures["l2_recon"]) > 0


def test_attention_window_limits_what_a_step_sees():
    torch.manual_seed(0)
    model = SRCID(SRCIDConfig(**SMALL, attention_window=1)).eval()
    x = torch.randn(2, 10, 20)
    changed = x.clone()
    changed[:, 5:] += 3.0
    a = model.layer1.general["audio"](x, torch.ones(2, 10, dtype=torch.bool))
    b = model.layer1.general["audio"](changed, torch.ones(2, 10, dtype=torch.bool))
    # Two layers of ±1-step attention reach 2 steps: steps 0..2 cannot see step 5.
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-5)
    assert not torch.allclose(a[:, 3:5], b[:, 3:5], atol=1e-3)
    full = SRCID(SRCIDConfig(**SMALL)).eval()
    c = full.layer1.general["audio"](x, torch.ones(2, 10, dtype=torch.bool))
    d = full.layer1.general["audio"](changed, torch.ones(2, 10, dtype=torch.bool))
    assert not torch.allclose(c[:, :3], d[:, :3], atol=1e-3)


@pytest.mark.parametrize("window", [None, 1])
def test_short_masked_input_is_finite_and_keeps_its_words(window):
    """A text of 2 words in T = 10 steps: with a window, padded steps have no valid neighbour; nothing may turn NaN."""
    torch.manual_seed(0)
    model = SRCID(SRCIDConfig(**SMALL, attention_window=window)).eval()
    x = torch.randn(3, 10, 12)
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[:, :2] = True
    z = model.layer1.general["text"](x, mask)
    assert torch.isfinite(z).all()
    out = model.encode("text", x, mask)
    assert torch.isfinite(out["embedding"]).all()
    other = x.clone()
    other[1, :2] = torch.randn(2, 12) * 3
    assert not torch.allclose(model.encode("text", other, mask)["embedding"][1], out["embedding"][1], atol=1e-4)
    none = model.encode("text", x, torch.zeros(3, 10, dtype=torch.bool))  # no valid step at all
    assert torch.isfinite(none["embedding"]).all()
