"""SenseVoiceSmall input and output ends: funasr's ``WavFrontend`` and the BPE piece table.

Audio front end (what funasr's ``WavFrontend`` computes for SenseVoiceSmall, see
``shared/notes/models.md`` §6), for 16 kHz mono float audio in [-1, 1]:

1. scale by 32768 (int16 range, as funasr's ``upsacle_samples``);
2. Kaldi fbank: 25 ms Hamming windows every 10 ms with ``snip_edges`` (frame ``k`` covers
   samples ``[160k, 160k + 400)``, so ``floor((N - 400) / 160) + 1`` frames), DC offset
   removed, pre-emphasis 0.97, 512-point power spectrum, 80 Kaldi mel bands (20 Hz to
   Nyquist), natural log floored at float32 epsilon. Dither is 0 so features are
   deterministic (funasr's ``WavFrontend`` defaults to dither 1.0: Gaussian noise of one
   int16 step, which SenseVoiceSmall's config does not override);
3. LFR m=7 n=6 (:func:`apply_lfr`): output frame ``i`` stacks fbank frames ``6i-3 … 6i+3``
   (indices clamped into the utterance), 560-d at 60 ms per frame (≈16.67 Hz),
   ``ceil(fbank_frames / 6)`` frames;
4. CMVN from ``am.mvn`` (:func:`parse_am_mvn`): ``(x + shift) * scale``.

Output end: the tokenizer file ``*.bpe.model`` is a sentencepiece ``ModelProto``. Only its
piece table is needed to turn CTC ids back into text, so :class:`PieceTable` reads that
table straight from the protobuf wire format and the ``sentencepiece`` package is not a
dependency. Decoding follows sentencepiece's rules for control, unknown, byte and
``▁``-prefixed pieces; special tags such as ``<|en|>`` are user-defined pieces.
:func:`tiny_piece_table` is the 64-piece vocabulary of the tiny random test model.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE_HZ = 16_000
WAVE_SCALE = 32768.0
LOG_FLOOR = float(np.finfo(np.float32).eps)  # Kaldi/torchaudio floor before the log
MEL_LOW_HZ = 20.0


@dataclass(frozen=True)
class FrontendConfig:
    """``frontend_conf`` of the official ``config.yaml`` (``WavFrontend``)."""

    fs: int = SAMPLE_RATE_HZ
    window: str = "hamming"
    n_mels: int = 80
    frame_length: int = 25  # ms
    frame_shift: int = 10  # ms
    lfr_m: int = 7
    lfr_n: int = 6

    @property
    def window_samples(self) -> int:
        return self.fs * self.frame_length // 1000

    @property
    def hop_samples(self) -> int:
        return self.fs * self.frame_shift // 1000

    @property
    def output_size(self) -> int:
        """Width of one LFR frame: ``n_mels * lfr_m`` (560 for SenseVoiceSmall)."""
        return self.n_mels * self.lfr_m


def sensevoice_num_frames(num_samples: int, config: FrontendConfig | None = None) -> int:
    """Speech frames for ``num_samples`` of 16 kHz audio, prompt frames excluded.

    ``ceil(F / 6)`` with ``F = floor((N - 400) / 160) + 1`` fbank frames (0 if ``N < 400``):
    1 s → 17, 2 s → 33, 5 s → 83.
    """
    cfg = config or FrontendConfig()
    if num_samples < cfg.window_samples:
        return 0
    fbank_frames = (num_samples - cfg.window_samples) // cfg.hop_samples + 1
    return -(-fbank_frames // cfg.lfr_n)


def _mel(freq: np.ndarray | float) -> np.ndarray:
    """Kaldi's mel scale: ``1127 ln(1 + f / 700)``."""
    return 1127.0 * np.log1p(np.asarray(freq, dtype=np.float64) / 700.0)


def kaldi_mel_banks(n_mels: int, fft_size: int, fs: int) -> np.ndarray:
    """Triangular Kaldi mel filters ``(n_mels, fft_size // 2)`` over FFT bins ``0 … N/2 - 1``.

    Band ``b`` rises from mel ``lo + b·Δ`` to its centre ``lo + (b+1)·Δ`` and falls to
    ``lo + (b+2)·Δ``, with ``Δ = (mel(fs/2) - mel(20 Hz)) / (n_mels + 1)``; the Nyquist
    bin gets no weight, as in Kaldi.
    """
    mel_lo, mel_hi = _mel(MEL_LOW_HZ), _mel(fs / 2)
    delta = (mel_hi - mel_lo) / (n_mels + 1)
    left = mel_lo + delta * np.arange(n_mels)[:, None]
    bin_mel = _mel(np.arange(fft_size // 2) * fs / fft_size)[None, :]
    up = (bin_mel - left) / delta
    down = (left + 2 * delta - bin_mel) / delta
    return np.maximum(0.0, np.minimum(up, down))


def kaldi_fbank(samples: np.ndarray, config: FrontendConfig | None = None) -> np.ndarray:
    """Log mel filterbank ``(F, n_mels)`` float32 of already-scaled samples (int16 range).

    Kaldi's ``compute-fbank-feats`` as ``torchaudio.compliance.kaldi.fbank`` (what funasr
    calls) and kaldi-native-fbank implement it, with ``dither=0``, a Hamming window and the
    other defaults (``snip_edges``, DC removal, pre-emphasis 0.97, power spectrum,
    ``round_to_power_of_two``), computed in float64. Fewer samples than one window → 0 rows.
    """
    cfg = config or FrontendConfig()
    if cfg.window != "hamming":
        raise ValueError(f"only the hamming window is implemented, config asks {cfg.window!r}")
    win, hop = cfg.window_samples, cfg.hop_samples
    x = np.asarray(samples, dtype=np.float64).reshape(-1)
    if len(x) < win:
        return np.zeros((0, cfg.n_mels), np.float32)
    count = (len(x) - win) // hop + 1
    frames = np.lib.stride_tricks.sliding_window_view(x, win)[::hop][:count]
    frames = frames - frames.mean(axis=1, keepdims=True)
    previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = (frames - 0.97 * previous) * np.hamming(win)
    fft_size = 1 << (win - 1).bit_length()
    power = np.abs(np.fft.rfft(frames, n=fft_size)) ** 2
    mel = power[:, : fft_size // 2] @ kaldi_mel_banks(cfg.n_mels, fft_size, cfg.fs).T
    return np.log(np.maximum(mel, LOG_FLOOR)).astype(np.float32)


def apply_lfr(feats: np.ndarray, lfr_m: int, lfr_n: int) -> np.ndarray:
    """Low frame rate stacking as funasr's ``apply_lfr``: ``(T, D)`` → ``(ceil(T/n), m·D)``.

    The input is left-padded with ``(m - 1) // 2`` copies of its first frame; output frame
    ``i`` concatenates padded frames ``i·n … i·n + m - 1``, where indices past the end
    repeat the last frame.
    """
    total = len(feats)
    out_frames = -(-total // lfr_n)
    padded = np.concatenate([np.repeat(feats[:1], (lfr_m - 1) // 2, axis=0), feats])
    rows = np.arange(out_frames)[:, None] * lfr_n + np.arange(lfr_m)[None, :]
    rows = np.minimum(rows, len(padded) - 1)
    return padded[rows].reshape(out_frames, lfr_m * feats.shape[1]).astype(np.float32)


def parse_am_mvn(text: str) -> tuple[np.ndarray, np.ndarray]:
    """``(shift, scale)`` float32 vectors from a Kaldi-nnet ``am.mvn`` text.

    Reads the bracketed vector after ``<AddShift>`` and after ``<Rescale>`` (each written as
    ``<LearnRateCoef> 0 [ v1 v2 … ]``); both must be present and of equal length.
    """
    tokens = text.split()
    vectors: dict[str, np.ndarray] = {}
    for tag in ("<AddShift>", "<Rescale>"):
        if tag not in tokens:
            raise ValueError(f"am.mvn has no {tag} component")
        start = tokens.index("[", tokens.index(tag)) + 1
        stop = tokens.index("]", start)
        vectors[tag] = np.asarray(tokens[start:stop], dtype=np.float32)
    shift, scale = vectors["<AddShift>"], vectors["<Rescale>"]
    if shift.shape != scale.shape or shift.size == 0:
        raise ValueError(f"am.mvn shift/scale sizes differ or are empty: {shift.size}/{scale.size}")
    return shift, scale


def compute_features(
    wave: np.ndarray,
    config: FrontendConfig | None = None,
    cmvn: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Encoder input ``(sensevoice_num_frames(N), n_mels·lfr_m)`` float32 for a float wave.

    ``wave`` is mono at ``config.fs`` in [-1, 1]. Without ``cmvn`` the normalisation step is
    skipped (tiny random models ship no ``am.mvn``).
    """
    cfg = config or FrontendConfig()
    fbank = kaldi_fbank(np.asarray(wave, dtype=np.float64) * WAVE_SCALE, cfg)
    feats = apply_lfr(fbank, cfg.lfr_m, cfg.lfr_n)
    if cmvn is not None:
        shift, scale = cmvn
        if shift.size != feats.shape[1]:
            raise ValueError(f"am.mvn has {shift.size} dims, the front end makes {feats.shape[1]}")
        feats = (feats + shift) * scale
    return feats.astype(np.float32)


# --- BPE piece table ---------------------------------------------------------------------

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # sentencepiece types
_TAG = re.compile(r"^<\|(.+)\|>$")
_UNKNOWN_SURFACE = " \u2047 "  # what sentencepiece prints for <unk>


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated protobuf varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """``(field number, value)`` of one protobuf message: varints as int, others as bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        wire = key & 7
        value: int | bytes
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire in (1, 2, 5):
            size = {1: 8, 5: 4}.get(wire)
            if size is None:
                size, pos = _read_varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
            if pos > len(buf):
                raise ValueError("truncated protobuf field")
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, value


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _length_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


@dataclass(frozen=True)
class PieceTable:
    """Token id → piece text and sentencepiece piece type, from a ``*.bpe.model`` file."""

    pieces: tuple[str, ...]
    types: tuple[int, ...]

    @classmethod
    def read(cls, path: Path) -> PieceTable:
        """Read ``ModelProto.pieces`` (field 1: piece = 1, score = 2, type = 3)."""
        pieces: list[str] = []
        types: list[int] = []
        for number, value in _fields(path.read_bytes()):
            if number != 1 or not isinstance(value, bytes):
                continue
            piece, kind = "", NORMAL
            for sub_number, sub_value in _fields(value):
                if sub_number == 1 and isinstance(sub_value, bytes):
                    piece = sub_value.decode("utf-8")
                elif sub_number == 3 and isinstance(sub_value, int):
                    kind = sub_value
            pieces.append(piece)
            types.append(kind)
        if not pieces:
            raise ValueError(f"{path} holds no sentencepiece pieces")
        return cls(tuple(pieces), tuple(types))

    def write(self, path: Path) -> None:
        """Write the table as a minimal ``ModelProto`` that :meth:`read` accepts."""
        body = b"".join(
            _length_field(1, _length_field(1, p.encode()) + _varint(3 << 3) + _varint(t))
            for p, t in zip(self.pieces, self.types, strict=True)
        )
        path.write_bytes(body)

    def __len__(self) -> int:
        return len(self.pieces)

    def tag(self, token_id: int) -> str | None:
        """``"en"`` for a ``<|en|>`` piece; None when the id is not a special tag."""
        match = _TAG.match(self.pieces[token_id])
        return match.group(1) if match else None

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids: control pieces dropped, ``<0xNN>`` bytes joined, ``▁`` → space."""
        out = bytearray()
        for token_id in ids:
            kind, piece = self.types[token_id], self.pieces[token_id]
            if kind == CONTROL:
                continue
            if kind == UNKNOWN:
                out += _UNKNOWN_SURFACE.encode()
            elif kind == BYTE:
                out.append(int(piece[3:-1], 16))
            else:
                out += piece.encode()
        text = out.decode("utf-8", errors="replace").replace("\u2581", " ")
        return text[1:] if text.startswith(" ") else text


def tiny_piece_table() -> PieceTable:
    """64 pieces: ``<unk>``/``<s>``/``</s>``, the official tag names (not their official
    ids), then letter pieces; the tiny model reads its tags and text through this table."""
    names = (
        *("zh", "en", "yue", "ja", "ko", "nospeech"),
        *("HAPPY", "SAD", "ANGRY", "NEUTRAL", "FEARFUL", "DISGUSTED", "SURPRISED", "EMO_UNKNOWN"),
        *("Speech", "BGM", "Applause", "Laughter", "Cry", "Sneeze", "Breath", "Cough"),
        *("Event_UNK", "withitn", "woitn"),
    )
    tags = [f"<|{name}|>" for name in names]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words = ["\u2581" + c for c in letters[: 64 - 3 - len(tags) - len(letters)]] + letters
    pieces = ("<unk>", "<s>", "</s>", *tags, *words)
    types = (UNKNOWN, CONTROL, CONTROL, *[USER_DEFINED] * len(tags), *[NORMAL] * len(words))
    return PieceTable(pieces, types)
