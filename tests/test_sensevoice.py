"""SenseVoiceSmall in-project: front end, official key layout, tiny-model round trip, decoding."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoints import CheckpointError, CheckpointMismatchError
from models.registry import PROVENANCE_FILE, ModelSpec, ModelUnavailableError, ensure_model
from models.sensevoice import (
    FEATURE_DIM,
    PROMPT_FRAMES,
    TINY_ENCODER_CONF,
    SenseVoiceSmall,
    decode_ctc,
    extract_sensevoice,
    load_sensevoice,
)
from models.sensevoice_frontend import (
    BYTE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    USER_DEFINED,
    FrontendConfig,
    PieceTable,
    apply_lfr,
    compute_features,
    kaldi_fbank,
    parse_am_mvn,
    sensevoice_num_frames,
    tiny_piece_table,
)

SR = 16_000
# encoder_conf of the official SenseVoiceSmall config.yaml (FunAudioLLM/SenseVoiceSmall)
OFFICIAL_ENCODER_CONF = {
    "output_size": 512,
    "attention_heads": 4,
    "linear_units": 2048,
    "num_blocks": 50,
    "tp_blocks": 20,
    "dropout_rate": 0.1,
    "positional_dropout_rate": 0.1,
    "attention_dropout_rate": 0.1,
    "input_layer": "pe",
    "pos_enc_class": "SinusoidalPositionEncoder",
    "normalize_before": True,
    "kernel_size": 11,
    "sanm_shfit": 0,
    "selfattention_layer_type": "sanm",
}


def _speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    t = np.arange(round(seconds * SR)) / SR
    rng = np.random.default_rng(seed)
    voiced = 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 4 * t))
    return (voiced + 0.02 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sensevoice")
    spec = ModelSpec(family="sensevoice", source="models/sv-tiny", tiny_random=True, seed=7)
    path = ensure_model(spec, root)
    assert path is not None
    return path


@pytest.fixture(scope="module")
def tiny_model(tiny_dir: Path) -> SenseVoiceSmall:
    return load_sensevoice(tiny_dir)


# --- framing ------------------------------------------------------------------------------


@pytest.mark.parametrize("seconds", [0.5, 1.0, 2.0, 3.3, 5.0])
def test_frame_count_formula_and_features(tiny_model: SenseVoiceSmall, seconds: float) -> None:
    n = round(seconds * SR)
    expected = math.ceil(((n - 400) // 160 + 1) / 6)
    assert sensevoice_num_frames(n) == expected
    out = extract_sensevoice(tiny_model, _speechlike(seconds))
    assert out.features.shape == (expected, TINY_ENCODER_CONF["output_size"])
    assert out.features.dtype == np.float32 and np.isfinite(out.features).all()


def test_frame_counts_match_the_notes() -> None:
    assert [sensevoice_num_frames(s * SR) for s in (1, 2, 5)] == [17, 33, 83]
    assert sensevoice_num_frames(399) == 0 and sensevoice_num_frames(400) == 1


def test_prompt_frames_are_dropped(tiny_model: SenseVoiceSmall) -> None:
    wave = _speechlike(1.0)
    out = extract_sensevoice(tiny_model, wave)
    with torch.inference_mode():
        feats = torch.from_numpy(compute_features(wave, tiny_model.frontend, tiny_model.cmvn))
        hidden = tiny_model.encoder(torch.cat([tiny_model.prompt(), feats])[None])[0]
    assert hidden.shape[0] == len(out.features) + PROMPT_FRAMES == 17 + 4
    np.testing.assert_allclose(out.features, hidden[PROMPT_FRAMES:].numpy(), atol=1e-6)


# --- front end ----------------------------------------------------------------------------


def test_lfr_rows_follow_funasr_padding() -> None:
    feats = np.repeat(np.arange(13, dtype=np.float32)[:, None], 2, axis=1)  # row r holds r
    out = apply_lfr(feats, 7, 6)
    assert out.shape == (3, 14)  # ceil(13 / 6) frames of 7 × 2 dims
    rows = out[:, ::2]  # first dim of each stacked frame = its source row
    np.testing.assert_array_equal(rows[0], [0, 0, 0, 0, 1, 2, 3])  # 3 copies of row 0 on the left
    np.testing.assert_array_equal(rows[1], [3, 4, 5, 6, 7, 8, 9])
    np.testing.assert_array_equal(rows[2], [9, 10, 11, 12, 12, 12, 12])  # last row repeated
    np.testing.assert_array_equal(apply_lfr(feats[:1], 7, 6)[0, ::2], [0] * 7)
    np.testing.assert_array_equal(apply_lfr(feats[:7], 7, 6)[1, ::2], [3, 4, 5, 6, 6, 6, 6])


def test_am_mvn_parsing_and_cmvn(tmp_path: Path) -> None:
    text = (
        "<Nnet>\n<Splice> 3 3\n[ 0 ]\n<AddShift> 3 3\n<LearnRateCoef> 0 [ -1.5 2 0.25 ]\n"
        "<Rescale> 3 3\n<LearnRateCoef> 0 [ 0.5 1 4 ]\n</Nnet>\n"
    )
    shift, scale = parse_am_mvn(text)
    np.testing.assert_array_equal(shift, np.array([-1.5, 2, 0.25], np.float32))
    np.testing.assert_array_equal(scale, np.array([0.5, 1, 4], np.float32))
    with pytest.raises(ValueError, match="Rescale"):
        parse_am_mvn(text.split("<Rescale>")[0])
    # applied as (x + shift) * scale on the 560-d LFR frames
    wave = _speechlike(0.5)
    raw = compute_features(wave)
    shift560 = np.linspace(-14, -8, 560, dtype=np.float32)
    scale560 = np.linspace(0.1, 0.2, 560, dtype=np.float32)
    normed = compute_features(wave, cmvn=(shift560, scale560))
    np.testing.assert_allclose(normed, (raw + shift560) * scale560, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="3 dims"):
        compute_features(wave, cmvn=(shift, scale))


def test_fbank_properties() -> None:
    n = 8000
    t = np.arange(n) / SR
    tone = 0.5 * np.sin(2 * np.pi * 1000 * t) * 32768
    fb = kaldi_fbank(tone)
    assert fb.shape == ((n - 400) // 160 + 1, 80) and fb.dtype == np.float32
    # 1 kHz falls in the band whose Kaldi-mel centre is nearest mel(1 kHz)
    mel = lambda f: 1127 * np.log(1 + f / 700)  # noqa: E731
    centres = mel(20) + (mel(8000) - mel(20)) / 81 * np.arange(1, 81)
    assert (fb.argmax(axis=1) == np.abs(centres - mel(1000)).argmin()).all()
    # the DC offset is removed per frame; silence hits the log floor
    np.testing.assert_allclose(kaldi_fbank(tone + 1000.0), fb, atol=1e-3)
    np.testing.assert_allclose(kaldi_fbank(np.zeros(800)), np.log(np.finfo(np.float32).eps))
    assert kaldi_fbank(np.zeros(399)).shape == (0, 80)


def test_fbank_matches_torchaudio() -> None:
    kaldi = pytest.importorskip("torchaudio.compliance.kaldi")
    wave = _speechlike(1.3)
    ref = kaldi.fbank(
        torch.from_numpy(wave)[None] * 32768,
        num_mel_bins=80,
        frame_length=25,
        frame_shift=10,
        dither=0.0,
        energy_floor=0.0,
        window_type="hamming",
        sample_frequency=SR,
    )
    np.testing.assert_allclose(kaldi_fbank(wave * 32768.0), ref.numpy(), atol=1e-3)


# --- official layout ----------------------------------------------------------------------


def test_official_size_key_names_and_shapes() -> None:
    with torch.device("meta"):
        model = SenseVoiceSmall(OFFICIAL_ENCODER_CONF, FrontendConfig().output_size, 25055)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(shapes) == 917
    assert shapes["embed.weight"] == (16, 560)
    assert shapes["encoder.encoders0.0.self_attn.linear_q_k_v.weight"] == (1536, 560)
    assert shapes["encoder.encoders0.0.self_attn.fsmn_block.weight"] == (512, 1, 11)
    assert shapes["encoder.encoders0.0.norm1.weight"] == (560,)
    assert shapes["encoder.encoders.48.feed_forward.w_1.weight"] == (2048, 512)
    assert "encoder.encoders.49.norm1.weight" not in shapes  # num_blocks - 1 = 49 blocks
    assert shapes["encoder.tp_encoders.19.self_attn.linear_out.weight"] == (512, 512)
    assert "encoder.tp_encoders.20.norm1.weight" not in shapes
    assert shapes["encoder.after_norm.weight"] == shapes["encoder.tp_norm.bias"] == (512,)
    assert shapes["ctc.ctc_lo.weight"] == (25055, FEATURE_DIM)
    params = sum(p.numel() for p in model.parameters())
    assert params == 233_999_167  # ≈234.0 M, models.md §6


# --- tiny model through the official loading path -----------------------------------------


def test_tiny_round_trip_is_identical(tiny_dir: Path, tiny_model: SenseVoiceSmall) -> None:
    assert sorted(p.name for p in tiny_dir.iterdir()) == sorted(
        ["config.yaml", "model.pt", "tiny_spectok.bpe.model", PROVENANCE_FILE]
    )
    assert json.loads((tiny_dir / PROVENANCE_FILE).read_text())["origin"] == "random-init"
    assert tiny_model.cmvn is None and len(tiny_model.tokens or ()) == 64
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        fresh = SenseVoiceSmall(TINY_ENCODER_CONF, 560, 64).eval()
    fresh.tokens = tiny_piece_table()
    wave = _speechlike(2.0, seed=3)
    a, b = extract_sensevoice(fresh, wave), extract_sensevoice(tiny_model, wave)
    np.testing.assert_array_equal(a.features, b.features)
    assert (a.language, a.emotion, a.event, a.transcript) == (
        b.language,
        b.emotion,
        b.event,
        b.transcript,
    )
    for tag in (b.language, b.emotion, b.event):
        assert tag is None or isinstance(tag, str)


def test_wrong_key_fails_clearly(tiny_dir: Path, tmp_path: Path) -> None:
    for name in ("config.yaml", "tiny_spectok.bpe.model"):
        (tmp_path / name).write_bytes((tiny_dir / name).read_bytes())
    state = torch.load(tiny_dir / "model.pt", weights_only=True)
    state["encoder.encoders.0.self_attn.linear_qkv.weight"] = state.pop(
        "encoder.encoders.0.self_attn.linear_q_k_v.weight"
    )
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(
        CheckpointMismatchError,
        match=r"\n  missing: encoder\.encoders\.0\.self_attn\.linear_q_k_v\.weight\n"
        r"  unexpected: encoder\.encoders\.0\.self_attn\.linear_qkv\.weight",
    ):
        load_sensevoice(tmp_path)
    state = torch.load(tiny_dir / "model.pt", weights_only=True)
    state["ctc.ctc_lo.weight"] = state["ctc.ctc_lo.weight"][:60]
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(
        CheckpointMismatchError,
        match=r"mis-shaped: ctc\.ctc_lo\.weight: checkpoint \(60, 32\) vs model \(64, 32\)",
    ):
        load_sensevoice(tmp_path)
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=1)}, tmp_path / "model.pt")
    with pytest.raises(
        CheckpointError, match=r"refused .*model\.pt: .*Namespace.* convert it once"
    ):
        load_sensevoice(tmp_path)


def test_wrapped_checkpoint_and_missing_tokenizer(tiny_dir: Path, tmp_path: Path) -> None:
    state = torch.load(tiny_dir / "model.pt", weights_only=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "model.pt")
    (tmp_path / "config.yaml").write_bytes((tiny_dir / "config.yaml").read_bytes())
    with pytest.raises(ModelUnavailableError, match="no vocab_size"):
        load_sensevoice(tmp_path)
    with (tmp_path / "config.yaml").open("a") as fh:
        fh.write("vocab_size: 64\n")
    model = load_sensevoice(tmp_path)
    out = extract_sensevoice(model, _speechlike(1.0))
    assert (out.language, out.emotion, out.event, out.transcript) == (None, None, None, "")
    assert out.features.shape == (17, 32)


def test_ctc_ids_are_the_argmax_of_every_speech_row_and_need_no_tokenizer(
    tiny_model: SenseVoiceSmall,
) -> None:
    wave = _speechlike(2.0)
    out = extract_sensevoice(tiny_model, wave)
    with torch.inference_mode():
        feats = torch.from_numpy(compute_features(wave, tiny_model.frontend, tiny_model.cmvn))
        hidden = tiny_model.encoder(torch.cat([tiny_model.prompt(), feats])[None])[0]
        logits = tiny_model.ctc.ctc_lo(hidden)
    assert out.ctc_ids.dtype == np.int64 and out.ctc_ids.shape == (len(out.features),) == (33,)
    np.testing.assert_array_equal(out.ctc_ids, logits[PROMPT_FRAMES:].argmax(-1).numpy())
    assert out.vocab_size == logits.shape[-1] == 64 and len(set(out.ctc_ids.tolist())) > 1
    _, transcript = decode_ctc(logits.argmax(-1).tolist(), tiny_model.tokens)
    assert out.transcript == transcript
    tokens, tiny_model.tokens = tiny_model.tokens, None
    try:
        bare = extract_sensevoice(tiny_model, wave)
    finally:
        tiny_model.tokens = tokens
    np.testing.assert_array_equal(bare.ctc_ids, out.ctc_ids)
    assert bare.transcript == ""


def test_bad_input_is_rejected(tiny_model: SenseVoiceSmall) -> None:
    with pytest.raises(ValueError, match="float wave"):
        extract_sensevoice(tiny_model, (_speechlike(1.0) * 32767).astype(np.int16))
    with pytest.raises(ValueError, match="shorter than one fbank window"):
        extract_sensevoice(tiny_model, np.zeros(399, np.float32))
    with pytest.raises(ValueError, match="language must be one of"):
        extract_sensevoice(tiny_model, _speechlike(1.0), language="fr")


# --- tokens and CTC decoding --------------------------------------------------------------


def test_piece_table_round_trip_and_decode(tmp_path: Path) -> None:
    table = PieceTable(
        ("<unk>", "<s>", "<|en|>", "\u2581he", "llo", "\u2581w", "<0xC3>", "<0xA9>", "x"),
        (UNKNOWN, CONTROL, USER_DEFINED, NORMAL, NORMAL, NORMAL, BYTE, BYTE, NORMAL),
    )
    table.write(tmp_path / "t.bpe.model")
    assert PieceTable.read(tmp_path / "t.bpe.model") == table
    assert table.decode([1, 3, 4, 5, 6, 7]) == "hello w\u00e9"  # control dropped, bytes joined
    assert table.decode([2, 3, 0]) == "<|en|> he \u2047 "
    assert table.tag(2) == "en" and table.tag(3) is None
    (tmp_path / "broken.bpe.model").write_bytes(b"\x0a\xff")
    with pytest.raises(ValueError, match="truncated"):
        PieceTable.read(tmp_path / "broken.bpe.model")


def test_decode_ctc_reads_prompt_tags_and_greedy_text() -> None:
    tokens = tiny_piece_table()
    pid = {p: i for i, p in enumerate(tokens.pieces)}
    prompt = [pid["<|en|>"], pid["<|NEUTRAL|>"], pid["<|Speech|>"], pid["<|woitn|>"]]
    speech = [pid["\u2581a"], pid["\u2581a"], pid["b"], 0, pid["b"], pid["\u2581c"], 0, 0]
    tags, text = decode_ctc(prompt + speech, tokens)
    assert tags == ("en", "NEUTRAL", "Speech")
    assert text == "abb c"  # repeats collapsed, blanks split the two b's, ▁ becomes a space
    assert decode_ctc([pid["a"]] * 4, tokens) == ((None, None, None), "")
