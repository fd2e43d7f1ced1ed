"""Front-ends: log-mel against an independent numpy computation, decoders on real files, networks with random
safetensors weights, MiniLM against sentence-transformers, and the missing-weights errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import save_file

from srcid.model.frontends import (
    FrontEnd,
    MediaError,
    MissingWeightsError,
    WeightsMismatchError,
    get_frontend,
    load_audio,
    load_frames,
    load_video,
)
from srcid.model.frontends.logmel import log_mel

SR = 16000


def tone(freq: float, seconds: float, rate: int = SR, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def reference_log_mel(wave: np.ndarray) -> np.ndarray:
    """VGGish's recipe written out plainly in float64: explicit framing loop, Hann by formula, interp triangles."""
    n_win, hop, n_fft = 400, 160, 512
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_win) / n_win)
    n_frames = 1 + (len(wave) - n_win) // hop
    spec = np.stack([np.abs(np.fft.rfft(wave[i * hop : i * hop + n_win] * window, n_fft)) for i in range(n_frames)])
    mel = lambda f: 1127.0 * np.log(1.0 + np.asarray(f) / 700.0)  # noqa: E731
    bin_mel = mel(np.arange(n_fft // 2 + 1) * (SR / 2) / (n_fft // 2))
    edges = np.linspace(mel(125.0), mel(7500.0), 66)
    weights = np.stack([np.interp(bin_mel, edges[i : i + 3], [0.0, 1.0, 0.0], left=0.0, right=0.0)
                        for i in range(64)], axis=1)
    weights[0] = 0.0
    return np.log(spec @ weights + 0.01)


def test_log_mel_matches_independent_numpy_reference():
    rng = np.random.default_rng(0)
    wave = (0.3 * rng.standard_normal(SR) + tone(700, 1.0)).astype(np.float32)
    ours = log_mel(torch.from_numpy(wave)[None])[0].numpy()
    ref = reference_log_mel(wave.astype(np.float64))
    assert ours.shape == ref.shape == (98, 64)
    np.testing.assert_allclose(ours, ref, atol=2e-3)


@pytest.mark.parametrize("freq", [500.0, 1000.0, 3000.0])
def test_tone_peaks_in_the_mel_band_centred_nearest_its_frequency(freq):
    edges_mel = np.linspace(1127 * np.log1p(125 / 700), 1127 * np.log1p(7500 / 700), 66)
    centres_hz = 700 * (np.exp(edges_mel[1:-1] / 1127) - 1)
    feats = get_frontend("logmel")([tone(freq, 10.0)])
    assert feats.values.shape == (1, 10, 96, 64)
    peak = feats.values[0].mean(axis=(0, 1)).argmax()
    assert peak == np.abs(centres_hz - freq).argmin()


def test_patches_start_at_each_second_and_short_audio_is_padded_and_masked():
    rng = np.random.default_rng(1)
    wave = rng.standard_normal(int(2.5 * SR)).astype(np.float32)
    feats = get_frontend("logmel", T=4)([wave])
    full = log_mel(torch.from_numpy(np.pad(wave, (0, 4 * SR - len(wave))))[None])[0].numpy()
    for t in range(4):
        np.testing.assert_allclose(feats.values[0, t], full[100 * t : 100 * t + 96], rtol=1e-5, atol=1e-5)
    assert feats.mask.tolist() == [[True, True, True, False]]
    np.testing.assert_allclose(feats.values[0, 3], np.log(0.01), atol=1e-6)  # silence after the end


def test_pooled_log_mel_is_standardised_deterministic_and_keeps_time_shape():
    fe = get_frontend("logmel-pooled")
    assert isinstance(fe, FrontEnd) and fe.output_shape == (128,)
    # a rising chirp-like pair: 500 Hz in the first half of second 0, 3 kHz in the second half
    wave = np.concatenate([tone(500, 0.48), tone(3000, 0.52), np.zeros(SR)]).astype(np.float32)
    a, b = fe([wave, wave[::-1].copy()]), fe([wave, wave[::-1].copy()])
    np.testing.assert_array_equal(a.values, b.values)
    v = a.values[0, 0]
    np.testing.assert_allclose(v.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(v.std(), 1.0, atol=1e-4)
    grid = v.reshape(8, 16)  # time-major: early rows low band, late rows high band
    assert grid[:3].argmax(axis=1).max() < grid[5:].argmax(axis=1).min()
    np.testing.assert_allclose(a.values[0, 2], 0.0, atol=1e-6)  # silence sits at zero, not blown-up noise


def test_centring_aligns_a_word_wherever_it_falls_in_its_second():
    word = np.concatenate([tone(400, 0.15), tone(1200, 0.15), tone(2500, 0.1)]) * np.hanning(int(0.4 * SR))
    early, late = np.zeros(SR, np.float32), np.zeros(SR, np.float32)
    early[int(0.05 * SR) : int(0.45 * SR)] = word
    late[int(0.5 * SR) : int(0.9 * SR)] = word
    noise = 0.001 * np.random.default_rng(0).standard_normal(SR).astype(np.float32)
    centred = get_frontend("logmel-pooled", T=1)([early + noise, late + noise]).values[:, 0]
    fixed = get_frontend("logmel-pooled", T=1, centre=False)([early + noise, late + noise]).values[:, 0]
    corr = lambda a, b: float(np.corrcoef(a, b)[0, 1])  # noqa: E731
    assert corr(*centred) > 0.85  # measured 0.88; pooled-bin phase and the noise floor keep it below 1
    assert corr(*fixed) < 0.3  # measured -0.02


@pytest.mark.parametrize("fmt,subtype", [("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("OGG", "VORBIS")])
def test_load_audio_decodes_mixes_and_resamples(tmp_path, fmt, subtype):
    stereo = np.stack([tone(440, 1.0, 8000), tone(440, 1.0, 8000)], axis=1)
    path = tmp_path / f"x.{fmt.lower()}"
    sf.write(path, stereo, 8000, format=fmt, subtype=subtype)
    wave = load_audio(path)
    assert wave.dtype == np.float32 and abs(len(wave) - 2 * 8000) <= 2
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    assert abs(spectrum.argmax() * SR / len(wave) - 440) < 3
    np.testing.assert_allclose(load_audio(path.read_bytes()), wave)


def test_load_audio_rejects_corrupt_empty_and_missing_files(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not really a wave file")
    with pytest.raises(MediaError, match="bad.wav"):
        load_audio(bad)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), SR)
    with pytest.raises(MediaError, match="no samples"):
        load_audio(empty)
    with pytest.raises(FileNotFoundError, match="gone.wav"):
        load_audio(tmp_path / "gone.wav")


def write_video(path, fps: int, seconds: int, codec: str) -> None:
    """Frame i is uniformly grey with brightness 10 * (i % 25): the decoded value tells which frame was picked."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(fps * seconds):
            img = np.full((48, 64, 3), 10 * (i % 25), np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.mark.parametrize("suffix,codec", [("mp4", "libx264"), ("webm", "libvpx-vp9")])
def test_load_video_picks_the_frame_nearest_each_seconds_centre(tmp_path, suffix, codec):
    path = tmp_path / f"clip.{suffix}"
    write_video(path, fps=4, seconds=3, codec=codec)
    frames, mask = load_video(path, T=5)
    assert frames.shape == (5, 48, 64, 3)
    assert mask.tolist() == [True, True, True, False, False]
    # at 4 fps the frame shown at t + 0.5 s is frame 4t + 2
    for t in range(3):
        assert abs(float(frames[t].mean()) - 10 * ((4 * t + 2) % 25)) < 6
    with pytest.raises(MediaError, match="not a decodable"):
        load_video(b"\x00" * 1000)
    assert load_video(path, T=5, max_pixels=64 * 48)[0].shape == (5, 48, 64, 3)
    with pytest.raises(MediaError, match="64 x 48 pixels, at most 3071"):
        load_video(path, T=5, max_pixels=64 * 48 - 1)


def test_load_frames_from_png_and_jpeg_pads_and_truncates(tmp_path):
    from PIL import Image

    paths = []
    for i, ext in enumerate(["png", "jpg", "png"]):
        p = tmp_path / f"{i:03d}.{ext}"
        Image.fromarray(np.full((16, 16, 3), 40 * (i + 1), np.uint8)).save(p)
        paths.append(p)
    frames, mask = load_frames(paths, T=4)
    assert frames.shape == (4, 16, 16, 3) and mask.tolist() == [True, True, True, False]
    assert [int(round(frames[i].mean())) for i in range(4)] == [40, 80, 120, 0]
    frames2, mask2 = load_frames(paths, T=2)
    assert frames2.shape[0] == 2 and mask2.all()
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(MediaError, match="bad.png"):
        load_frames([tmp_path / "bad.png"])


def test_pixels_recover_an_upscaled_8x8_digit():
    from sklearn.datasets import load_digits

    digit = load_digits().images[5] / 16.0
    big = (np.kron(digit, np.ones((4, 4)))[..., None].repeat(3, -1) * 255).round().astype(np.uint8)
    fe = get_frontend("pixels", T=3)
    bigger = np.kron(big, np.ones((2, 2, 1), np.uint8))  # the same digit at 64 x 64 in the same batch
    feats = fe([(big[None], np.array([True])), bigger[None]])
    assert feats.values.shape == (2, 3, 64) and feats.mask.tolist() == [[True, False, False]] * 2
    np.testing.assert_allclose(feats.values[1], feats.values[0], atol=1e-5)
    expected = (digit - digit.mean()) / digit.std()
    np.testing.assert_allclose(feats.values[0, 0], expected.reshape(-1), atol=0.02)
    np.testing.assert_allclose(feats.values[0, 1:], 0.0)  # padded black frames stay at zero


def random_weights(net: torch.nn.Module, path, extra: dict | None = None) -> None:
    torch.manual_seed(0)
    tensors = {k: torch.randn_like(v) * 0.05 for k, v in net.state_dict().items()}
    save_file({**tensors, **(extra or {})}, str(path))


def test_vggish_loads_safetensors_and_is_deterministic(tmp_path):
    from srcid.model.frontends.vggish import VGGishNet

    path = tmp_path / "vggish.safetensors"
    pca = {"pca_eigen_vectors": torch.eye(128) * 3.0, "pca_means": torch.zeros(128)}
    random_weights(VGGishNet(), path, pca)
    fe = get_frontend("vggish", weights=path, T=3, device="cpu")
    waves = [np.random.default_rng(0).standard_normal(3 * SR).astype(np.float32), tone(1000, 1.5)]
    a, b = fe(waves), fe(waves)
    assert a.values.shape == (2, 3, 128)
    np.testing.assert_array_equal(a.values, b.values)
    assert a.mask.tolist() == [[True] * 3, [True, True, False]]
    assert not np.allclose(a.values[0, 0], a.values[1, 0])
    post = get_frontend("vggish", weights=path, T=3, device="cpu", postprocess=True)(waves).values
    assert post.min() >= 0 and post.max() <= 255 and np.array_equal(post, post.round())
    assert fe.spec()["weights"] == "vggish.safetensors"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_vggish_on_cuda_matches_cpu(tmp_path):
    from srcid.model.frontends.vggish import VGGishNet

    path = tmp_path / "vggish.safetensors"
    random_weights(VGGishNet(), path)
    waves = [np.random.default_rng(0).standard_normal(2 * SR).astype(np.float32)]
    cpu = get_frontend("vggish", weights=path, T=2, device="cpu")(waves).values
    gpu = get_frontend("vggish", weights=path, T=2, device="cuda")(waves).values
    np.testing.assert_allclose(gpu, cpu, atol=1e-3 * float(np.abs(cpu).max()))


def test_vgg19_pool5_shape_layout_and_determinism(tmp_path):
    from srcid.model.frontends.video_frontends import VGG19Net

    path = tmp_path / "vgg19.safetensors"
    random_weights(VGG19Net(), path)
    fe = get_frontend("vgg19-pool5", weights=path, T=1, device="cpu")
    frames = np.random.default_rng(0).integers(0, 255, (1, 120, 160, 3), dtype=np.uint8)
    a, b = fe([frames]), fe([frames])
    assert a.values.shape == (1, 1, 7, 7, 512)
    np.testing.assert_array_equal(a.values, b.values)
    # channels last: the same numbers as the network's [512, 7, 7] output
    x = torch.nn.functional.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255, size=(224, 224),
                                        mode="bilinear", antialias=True, align_corners=False)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    with torch.no_grad():
        direct = fe.net(x)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(a.values[0, 0], direct, atol=1e-4 * float(np.abs(direct).max()))


def test_bert_without_its_model_folder_says_so(tmp_path):
    with pytest.raises(MissingWeightsError, match="no model folder given"):
        get_frontend("bert")
    with pytest.raises(MissingWeightsError, match="config.json"):
        get_frontend("bert", model_dir=tmp_path)


@pytest.mark.parametrize("name", ["vggish", "vgg19-pool5"])
def test_missing_or_mismatched_weights_name_the_file(tmp_path, name):
    with pytest.raises(MissingWeightsError, match="no weights file given"):
        get_frontend(name)
    missing = tmp_path / "absent.safetensors"
    with pytest.raises(MissingWeightsError, match=str(missing)):
        get_frontend(name, weights=missing)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"features.0.weight": torch.zeros(1)}, str(wrong))
    with pytest.raises(WeightsMismatchError, match="wrong.safetensors"):
        get_frontend(name, weights=wrong)


def test_convert_torchvggish_and_torchvision_checkpoints(tmp_path):
    from srcid.model.frontends.convert import convert_vgg19, convert_vggish, main
    from srcid.model.frontends.video_frontends import VGG19Net
    from srcid.model.frontends.vggish import VGGishNet

    torch.manual_seed(0)
    net = VGGishNet()
    torch.save(net.state_dict(), tmp_path / "vggish.pth")
    # torchvggish's PCA file holds numpy arrays; the restricted unpickler must accept them
    torch.save({"pca_eigen_vectors": np.eye(128), "pca_means": np.zeros((128, 1))}, tmp_path / "pca.pth")
    out = convert_vggish(tmp_path / "vggish.pth", tmp_path / "vggish.safetensors", tmp_path / "pca.pth")
    fe = get_frontend("vggish", weights=out, T=1, device="cpu", postprocess=True)
    patch = torch.randn(1, 1, 96, 64)
    with torch.no_grad():
        np.testing.assert_allclose(fe.net(patch).numpy(), net(patch).numpy(), rtol=1e-6)

    vgg = VGG19Net()
    state = {**vgg.state_dict(), "classifier.0.weight": torch.zeros(2, 2)}  # torchvision's head is dropped
    torch.save(state, tmp_path / "vgg19.pth")
    assert main(["vgg19", "--pth", str(tmp_path / "vgg19.pth"), "--out", str(tmp_path / "vgg19.safetensors")]) == 0
    get_frontend("vgg19-pool5", weights=tmp_path / "vgg19.safetensors", device="cpu")
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "broken.pth")
    with pytest.raises(WeightsMismatchError, match="lacks"):
        convert_vgg19(tmp_path / "broken.pth", tmp_path / "broken.safetensors")


@pytest.fixture(scope="module")
def minilm():
    return get_frontend("minilm", T=4, device="cpu")


def test_minilm_word_vectors_are_its_sentence_embeddings_of_each_word(minilm):
    from sentence_transformers import SentenceTransformer

    from srcid.model.frontends.text import minilm_dir

    feats = minilm(["three nothing seven", "one two three four five six"])
    assert feats.values.shape == (2, 4, 384)
    assert feats.mask.tolist() == [[True, True, True, False], [True] * 4]  # fewer words masked, more truncated
    reference = SentenceTransformer(str(minilm_dir()), device="cpu").encode(["three", "nothing", "seven", "four"])
    np.testing.assert_allclose(feats.values[0, :3], reference[:3], atol=1e-5)
    np.testing.assert_allclose(feats.values[1, 3], reference[3], atol=1e-5)
    np.testing.assert_array_equal(feats.values[0, 3], 0.0)
    with pytest.raises(ValueError, match="text item 1"):
        minilm(["ok", "   "])


def test_word_cache_keeps_only_the_most_recently_used_words(minilm):
    """Clients' text cannot grow the word cache past `cache_words`; evicted words encode as before."""
    fe = get_frontend("minilm", T=4, device="cpu", cache_words=3)
    first = fe(["one two three"]).values
    fe(["four"])
    assert list(fe._word_cache) == ["three", "two", "four"]  # least recently used ("one") went first
    again = fe(["one two three", "nine eight seven six"])  # more new words in one call than the cache holds
    assert len(fe._word_cache) == 3
    np.testing.assert_allclose(again.values[:1], first, atol=1e-6)
    np.testing.assert_allclose(again.values, minilm(["one two three", "nine eight seven six"]).values, atol=1e-6)


def test_sentence_context_depends_on_neighbours():
    fe = get_frontend("minilm", T=3, context="sentence", device="cpu")
    feats = fe(["river bank", "money bank"])
    assert feats.mask.tolist() == [[True, True, False]] * 2
    np.testing.assert_allclose(np.linalg.norm(feats.values[:, :2], axis=-1), 1.0, atol=1e-5)
    assert float(feats.values[0, 1] @ feats.values[1, 1]) < 0.99  # "bank" differs with its neighbour


def test_bert_from_a_local_folder(tmp_path):
    import shutil

    from transformers import BertConfig, BertModel

    from srcid.model.frontends.text import minilm_dir

    folder = tmp_path / "tiny-bert"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_dir() / name, folder / name)
    fe = get_frontend("bert", model_dir=folder, T=5, device="cpu")
    feats = fe(["unbelievably quick tests", "a"])
    assert fe.output_shape == (32,) and feats.values.shape == (2, 5, 32)
    assert feats.mask.sum(axis=1).tolist() == [3, 1]
    np.testing.assert_array_equal(fe(["unbelievably quick tests", "a"]).values, feats.values)
    (folder / "model.safetensors").unlink()
    with pytest.raises(MissingWeightsError, match="model.safetensors"):
        get_frontend("bert", model_dir=folder)


def test_registry_rejects_unknown_names_and_options():
    with pytest.raises(KeyError, match="unknown front-end"):
        get_frontend("mfcc")
    with pytest.raises(ValueError, match="takes no option"):
        get_frontend("pixels", weights="x.safetensors")


def test_a_spec_rebuilds_the_same_front_end():
    for fe in (get_frontend("logmel-pooled", std_floor=0.5, T=6), get_frontend("pixels", size=4),
               get_frontend("minilm", context="sentence", T=3)):
        spec = fe.spec()
        options = {k: v for k, v in spec.items() if k not in ("name", "modality", "output_shape")}
        rebuilt = get_frontend(spec["name"], **options)
        assert rebuilt.spec() == spec and rebuilt.output_shape == fe.output_shape
