"""SenseVoiceSmall audio features, language/emotion/event tags and CTC transcript, in-project.

Family ``sensevoice`` (official weights: ``FunAudioLLM/SenseVoiceSmall`` / ``iic/SenseVoiceSmall``,
234 M parameters). The official model directory (``config.yaml``, ``model.pt``, ``am.mvn``,
``chn_jpn_yue_eng_ko_spectok.bpe.model``) loads strictly into these modules, whose names
follow funasr's ``SenseVoiceSmall``/``SenseVoiceEncoderSmall`` (MIT), so funasr itself
(≈890 MB of dependencies) is not needed. The front end lives in
:mod:`models.sensevoice_frontend`.

Encoder (SAN-M): input frames are scaled by ``sqrt(output_size)``, a sinusoidal position
code is added (positions 1…T, sines then cosines), then ``encoders0`` (1 block,
560 → 512, no residual around its attention), ``encoders`` (``num_blocks - 1``),
``after_norm``, ``tp_encoders`` (``tp_blocks``) and ``tp_norm``. Each pre-norm block's
attention adds an FSMN memory: a depthwise conv (kernel 11, no bias) over the values plus
the values themselves.

Prompt: four 560-d query vectors from ``embed`` are prepended before the encoder, exactly
as funasr's ``SenseVoiceSmall.inference`` builds them: language (``auto`` = 0), two fixed
queries 1 and 2, and the text-norm query (``woitn`` = 15 by default: no inverse text
normalisation, matching funasr's ``use_itn=False`` default; ``withitn`` = 14). At the
output, CTC argmax at those positions reads the language, emotion and event tags (the 4th
is the text-norm echo); features and transcript use only the frames after them.

Framing: features are ``(sensevoice_num_frames(N), 512)``, one row per 60 ms (≈16.67 Hz);
row ``i`` is centred near fbank frame ``6i`` (samples ``960i … 960i + 400``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.nn import functional as F

from models.checkpoints import load_into, read_state_dict
from models.registry import ModelUnavailableError, register_tiny_builder
from models.sensevoice_frontend import (
    FrontendConfig,
    PieceTable,
    compute_features,
    parse_am_mvn,
    sensevoice_num_frames,
    tiny_piece_table,
)

FEATURE_DIM = 512
FRAME_RATE_HZ = 1000.0 / 60.0
PROMPT_FRAMES = 4
BLANK_ID = 0
Tags = tuple[str | None, str | None, str | None]  # language, emotion, event
LANGUAGE_QUERY_IDS = {"auto": 0, "zh": 3, "en": 4, "yue": 7, "ja": 11, "ko": 12, "nospeech": 13}
TEXTNORM_QUERY_IDS = {"withitn": 14, "woitn": 15}
EVENT_EMOTION_QUERY_IDS = (1, 2)
NUM_QUERY_EMBEDDINGS = 7 + len(LANGUAGE_QUERY_IDS) + len(TEXTNORM_QUERY_IDS)  # 16
CONFIG_FILE, WEIGHTS_FILE, CMVN_FILE = "config.yaml", "model.pt", "am.mvn"
TINY_TOKENIZER_FILE = "tiny_spectok.bpe.model"
_CONVERT_HINT = (
    "If it is a trusted funasr checkpoint, convert it once to a plain state dict: "
    "python -c \"import torch; s = torch.load('model.pt', map_location='cpu', "
    "weights_only=False); s = s.get('state_dict', s); torch.save({k: v for k, v in "
    "s.items() if torch.is_tensor(v)}, 'model.pt')\""
)
TINY_ENCODER_CONF = {
    "output_size": 32,
    "attention_heads": 2,
    "linear_units": 64,
    "num_blocks": 3,
    "tp_blocks": 1,
    "input_layer": "pe",
    "pos_enc_class": "SinusoidalPositionEncoder",
    "normalize_before": True,
    "kernel_size": 11,
    "sanm_shfit": 0,
    "selfattention_layer_type": "sanm",
}


class SinusoidalPositionEncoder(nn.Module):
    """Adds ``[sin(p·w_k), cos(p·w_k)]`` for positions ``p = 1…T``, ``w_k = 10000^(-k/(D/2-1))``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, steps, depth = x.shape
        positions = torch.arange(1, steps + 1, device=x.device, dtype=torch.float32)
        rates = torch.exp(
            torch.arange(depth // 2, device=x.device, dtype=torch.float32)
            * -(math.log(10000.0) / (depth / 2 - 1))
        )
        angles = positions[:, None] * rates[None, :]
        return x + torch.cat([angles.sin(), angles.cos()], dim=-1).to(x.dtype)[None]


class MultiHeadedAttentionSANM(nn.Module):
    """Self-attention plus FSMN memory; ``linear_q_k_v`` maps ``in_feat`` → 3 × ``n_feat``."""

    def __init__(self, n_head: int, in_feat: int, n_feat: int, kernel_size: int, shift: int):
        super().__init__()
        self.h, self.d_k = n_head, n_feat // n_head
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.linear_q_k_v = nn.Linear(in_feat, n_feat * 3)
        self.fsmn_block = nn.Conv1d(n_feat, n_feat, kernel_size, groups=n_feat, bias=False)
        left = (kernel_size - 1) // 2 + max(shift, 0)
        self.padding = (left, kernel_size - 1 - left)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.linear_q_k_v(x).split(self.h * self.d_k, dim=-1)
        memory = self.fsmn_block(F.pad(v.transpose(1, 2), self.padding)).transpose(1, 2) + v
        q, k, vh = (z.reshape(b, t, self.h, self.d_k).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, vh)  # softmax(q kᵀ / sqrt(d_k)) v
        return self.linear_out(att.transpose(1, 2).reshape(b, t, self.h * self.d_k)) + memory


class PositionwiseFeedForward(nn.Module):
    def __init__(self, size: int, hidden: int):
        super().__init__()
        self.w_1, self.w_2 = nn.Linear(size, hidden), nn.Linear(hidden, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(torch.relu(self.w_1(x)))


class EncoderLayerSANM(nn.Module):
    """Pre-norm block; the attention residual is skipped when ``in_size != size``."""

    def __init__(self, in_size: int, size: int, heads: int, units: int, kernel: int, shift: int):
        super().__init__()
        self.self_attn = MultiHeadedAttentionSANM(heads, in_size, size, kernel, shift)
        self.feed_forward = PositionwiseFeedForward(size, units)
        self.norm1, self.norm2 = nn.LayerNorm(in_size), nn.LayerNorm(size)
        self.residual = in_size == size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        att = self.self_attn(self.norm1(x))
        x = x + att if self.residual else att
        return x + self.feed_forward(self.norm2(x))


# EncoderLayerSANM options from encoder_conf, with funasr's defaults
_LAYER_OPTIONS = (
    ("attention_heads", 4),
    ("linear_units", 2048),
    ("kernel_size", 11),
    ("sanm_shfit", 0),
)


class SenseVoiceEncoderSmall(nn.Module):
    """``(B, T, input_size)`` → ``(B, T, output_size)``; unpadded input (one utterance)."""

    def __init__(self, input_size: int, encoder_conf: dict[str, Any]):
        super().__init__()
        conf = dict(encoder_conf)
        wanted = {
            "input_layer": "pe",
            "selfattention_layer_type": "sanm",
            "normalize_before": True,
            "concat_after": False,
        }
        unsupported = {k: conf[k] for k, v in wanted.items() if conf.get(k, v) != v}
        if unsupported:
            raise ValueError(f"unsupported SenseVoiceEncoderSmall options: {unsupported}")
        size = self._output_size = int(conf.get("output_size", 256))
        opts = [int(conf.get(k, d)) for k, d in _LAYER_OPTIONS]
        self.embed = SinusoidalPositionEncoder()
        self.encoders0 = nn.ModuleList([EncoderLayerSANM(input_size, size, *opts)])
        self.encoders = nn.ModuleList(
            EncoderLayerSANM(size, size, *opts) for _ in range(int(conf.get("num_blocks", 6)) - 1)
        )
        self.tp_encoders = nn.ModuleList(
            EncoderLayerSANM(size, size, *opts) for _ in range(int(conf.get("tp_blocks", 0)))
        )
        self.after_norm, self.tp_norm = nn.LayerNorm(size), nn.LayerNorm(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x * self._output_size**0.5)
        for layer in [*self.encoders0, *self.encoders]:
            x = layer(x)
        x = self.after_norm(x)
        for layer in self.tp_encoders:
            x = layer(x)
        return self.tp_norm(x)


class CTC(nn.Module):
    def __init__(self, vocab_size: int, encoder_size: int):
        super().__init__()
        self.ctc_lo = nn.Linear(encoder_size, vocab_size)


class SenseVoiceSmall(nn.Module):
    """``embed`` (16 query vectors), ``encoder`` and ``ctc.ctc_lo``, plus the front end state.

    ``frontend``, ``cmvn`` (``(shift, scale)`` or None) and ``tokens`` (piece table or None)
    are plain attributes, not state-dict entries, so the official ``model.pt`` loads strictly.
    """

    def __init__(self, encoder_conf: dict[str, Any], input_size: int, vocab_size: int):
        super().__init__()
        self.embed = nn.Embedding(NUM_QUERY_EMBEDDINGS, input_size)
        self.encoder = SenseVoiceEncoderSmall(input_size, encoder_conf)
        self.ctc = CTC(vocab_size, self.encoder._output_size)
        self.frontend = FrontendConfig()
        self.cmvn: tuple[np.ndarray, np.ndarray] | None = None
        self.tokens: PieceTable | None = None

    def prompt(self, language: str = "auto", textnorm: str = "woitn") -> torch.Tensor:
        """The ``(4, input_size)`` query rows funasr's ``inference`` prepends."""
        if language not in LANGUAGE_QUERY_IDS or textnorm not in TEXTNORM_QUERY_IDS:
            raise ValueError(
                f"language must be one of {sorted(LANGUAGE_QUERY_IDS)} and textnorm one of "
                f"{sorted(TEXTNORM_QUERY_IDS)}, got {language!r}/{textnorm!r}"
            )
        ids = [LANGUAGE_QUERY_IDS[language], *EVENT_EMOTION_QUERY_IDS]
        ids.append(TEXTNORM_QUERY_IDS[textnorm])
        return self.embed(torch.tensor(ids, device=self.embed.weight.device))


@dataclass(frozen=True)
class SenseVoiceOutput:
    """Per-utterance result; tags are None without a tokenizer file or when no tag was emitted."""

    features: np.ndarray  # (sensevoice_num_frames(N), 512) float32, prompt frames dropped
    language: str | None  # e.g. "en", "zh", "nospeech"
    emotion: str | None  # e.g. "NEUTRAL", "HAPPY"
    event: str | None  # e.g. "Speech", "BGM"
    transcript: str  # greedy CTC over the speech frames; "" without a tokenizer file
    ctc_ids: np.ndarray  # (len(features),) int64 CTC argmax per speech row (blank = 0)
    vocab_size: int  # CTC vocabulary: every id lies in [0, vocab_size)


def _tokenizer_file(directory: Path, config: dict[str, Any]) -> Path | None:
    named = (config.get("tokenizer_conf") or {}).get("bpemodel")
    if named:
        return directory / named
    found = sorted(directory.glob("*bpe.model"))
    if len(found) > 1:
        raise ModelUnavailableError(f"several tokenizer files in {directory}: {found}")
    return found[0] if found else None


def load_sensevoice(model_dir: str | Path, device: str | torch.device = "cpu") -> SenseVoiceSmall:
    """Load an official-layout SenseVoiceSmall directory, in eval mode on ``device``.

    Reads ``config.yaml`` (``encoder_conf``, ``frontend_conf``), ``model.pt`` with
    ``weights_only=True`` (a plain state dict, or one under ``state_dict`` /
    ``model_state_dict`` / ``model``, ``module.`` prefixes stripped; strict: missing,
    unexpected or mis-shaped keys raise :class:`~models.checkpoints.CheckpointMismatchError`,
    a :class:`ModelUnavailableError`), ``am.mvn`` if present (else no CMVN) and the
    ``*.bpe.model`` piece table if present (else no tags or transcript). The encoder input
    size is ``n_mels * lfr_m``; the vocabulary size is ``vocab_size`` from the config if
    given, else the piece count of the tokenizer file, as funasr does.
    """
    directory = Path(model_dir)
    if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise ModelUnavailableError(f"{directory} lacks {CONFIG_FILE} or {WEIGHTS_FILE}")
    config = yaml.safe_load((directory / CONFIG_FILE).read_text()) or {}
    if (config.get("model"), config.get("encoder")) != (
        "SenseVoiceSmall",
        "SenseVoiceEncoderSmall",
    ):
        raise ModelUnavailableError(f"{directory / CONFIG_FILE} is not a SenseVoiceSmall config")
    fields = FrontendConfig.__dataclass_fields__
    frontend_conf = config.get("frontend_conf") or {}
    frontend = FrontendConfig(**{k: v for k, v in frontend_conf.items() if k in fields})
    token_file = _tokenizer_file(directory, config)
    tokens = PieceTable.read(token_file) if token_file is not None else None
    vocab_size = config.get("vocab_size") or (len(tokens) if tokens is not None else None)
    if vocab_size is None:
        raise ModelUnavailableError(f"{directory}: no vocab_size in config and no *.bpe.model")
    if tokens is not None and len(tokens) != vocab_size:
        raise ModelUnavailableError(f"{token_file} has {len(tokens)} pieces, vocab is {vocab_size}")
    cmvn_file = directory / (frontend_conf.get("cmvn_file") or CMVN_FILE)
    with torch.device("meta"):
        model = SenseVoiceSmall(config.get("encoder_conf") or {}, frontend.output_size, vocab_size)
    weights = directory / WEIGHTS_FILE
    state = read_state_dict(
        weights,
        containers=("state_dict", "model_state_dict", "model"),
        strip_prefix="module.",
        hint=_CONVERT_HINT,
    )
    state = {k: v.float() for k, v in state.items()}
    load_into(
        model, state, weights, what=f"SenseVoiceSmall as {CONFIG_FILE} describes it", assign=True
    )
    model.frontend, model.tokens = frontend, tokens
    model.cmvn = parse_am_mvn(cmvn_file.read_text()) if cmvn_file.is_file() else None
    return model.to(device).eval()


@torch.inference_mode()
def extract_sensevoice(
    model: SenseVoiceSmall, wave_16k: np.ndarray, language: str = "auto", textnorm: str = "woitn"
) -> SenseVoiceOutput:
    """Encoder features, tags and transcript for one mono float wave in [-1, 1] at 16 kHz.

    ``features[i]`` is encoder output row ``4 + i`` (the 4 prompt rows are dropped), so
    ``len(features) == sensevoice_num_frames(len(wave_16k))``. Tags are the CTC argmax at
    prompt rows 0 (language), 1 (emotion) and 2 (event), None when that piece is not a
    ``<|…|>`` tag. ``ctc_ids[i]`` is the CTC argmax of speech row ``i`` (the row of
    ``features[i]``; raw per row: blanks and repeats kept, no tokenizer needed). The
    transcript collapses repeats and drops blanks over the speech rows only (funasr decodes
    prompt and speech rows as one sequence, so a speech token equal to the last prompt token
    would merge there but not here). Waves shorter than one 25 ms window raise ``ValueError``.
    """
    wave = np.asarray(wave_16k)
    if wave.ndim != 1 or not np.issubdtype(wave.dtype, np.floating):
        raise ValueError(f"expected a 1-D float wave in [-1, 1], got {wave.dtype} {wave.shape}")
    if sensevoice_num_frames(len(wave), model.frontend) == 0:
        raise ValueError(f"audio of {len(wave)} samples is shorter than one fbank window")
    device = model.embed.weight.device
    feats = torch.from_numpy(compute_features(wave, model.frontend, model.cmvn)).to(device)
    x = torch.cat([model.prompt(language, textnorm), feats])[None]
    hidden = model.encoder(x)[0]
    ids = model.ctc.ctc_lo(hidden).argmax(dim=-1).cpu()
    tags: Tags = (None, None, None)
    transcript = ""
    if model.tokens is not None:
        tags, transcript = decode_ctc(ids.tolist(), model.tokens)
    language, emotion, event = tags
    features = hidden[PROMPT_FRAMES:].float().cpu().numpy()
    ctc_ids = ids[PROMPT_FRAMES:].numpy().astype(np.int64)
    vocab = model.ctc.ctc_lo.out_features
    return SenseVoiceOutput(features, language, emotion, event, transcript, ctc_ids, vocab)


def decode_ctc(ids: Sequence[int], tokens: PieceTable) -> tuple[Tags, str]:
    """``(language, emotion, event)`` from argmax ids at rows 0-2, and the greedy transcript.

    Each tag is the ``<|…|>`` piece name at its row or None; the transcript collapses
    repeated ids over rows 4… (the speech rows), drops blanks (id 0) and detokenizes.
    """
    language, emotion, event = (tokens.tag(i) for i in ids[:3])
    speech = [i for i, _ in groupby(ids[PROMPT_FRAMES:])]
    return (language, emotion, event), tokens.decode([i for i in speech if i != BLANK_ID])


@register_tiny_builder("sensevoice")
def build_tiny_sensevoice(directory: Path, seed: int) -> None:
    """Tiny random SenseVoiceSmall (hidden 32, 3 + 1 blocks, 64 pieces) in the official layout.

    Writes ``config.yaml`` (official keys, no ``vocab_size``: it comes from the tokenizer),
    ``model.pt`` (plain state dict) and ``tiny_spectok.bpe.model``; no ``am.mvn``, so CMVN
    is skipped. The real front end (80 mels, LFR 7/6, 560-d) keeps the exact framing.
    """
    tokens = tiny_piece_table()
    frontend = FrontendConfig()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SenseVoiceSmall(TINY_ENCODER_CONF, frontend.output_size, len(tokens))
    config = {
        "encoder": "SenseVoiceEncoderSmall",
        "encoder_conf": TINY_ENCODER_CONF,
        "model": "SenseVoiceSmall",
        "model_conf": {"length_normalized_loss": True, "sos": 1, "eos": 2, "ignore_id": -1},
        "tokenizer": "SentencepiecesTokenizer",
        "tokenizer_conf": {"bpemodel": None, "unk_symbol": "<unk>", "split_with_space": True},
        "frontend": "WavFrontend",
        "frontend_conf": {**asdict(frontend), "cmvn_file": None},
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
    tokens.write(directory / TINY_TOKENIZER_FILE)
    torch.save(
        {k: v.detach().clone() for k, v in model.state_dict().items()}, directory / WEIGHTS_FILE
    )
