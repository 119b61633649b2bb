"""Media I/O shared by stages: probe, streaming decode, encode, audio.

Everything goes through ffmpeg/ffprobe subprocesses with argument lists (never a shell),
built with ``ffmpeg-python``. Decoding streams raw RGB frames through a pipe, so a clip is
never held in memory whole; callers iterate :func:`iter_frames` in chunks. Pipe reads and
writes release the GIL, so :class:`ReadAhead` and ``VideoWriter(write_behind=...)`` move
them to a background thread: the decoder, the encoder and the caller's Python work overlap.
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import wave
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Generic, TypeVar

import ffmpeg
import numpy as np

from tasks.base import FailureKind, ItemFailure

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class MediaInfo:
    """What ffprobe reports about a file, in plain units."""

    duration_s: float
    width: int
    height: int
    fps: float
    num_frames: int | None  # from the container when it records it
    has_audio: bool
    audio_sample_rate_hz: int | None
    audio_channels: int | None
    video_codec: str


def probe(path: Path) -> MediaInfo:
    """Probe a media file; bad or truncated files raise ``ItemFailure(FORMAT)``."""
    if not path.exists() or path.stat().st_size == 0:
        raise ItemFailure(FailureKind.FORMAT, f"{path.name}: empty or missing file")
    try:
        meta = ffmpeg.probe(str(path))
    except ffmpeg.Error as exc:
        tail = (exc.stderr or b"").decode(errors="replace").strip().splitlines()[-1:]
        raise ItemFailure(FailureKind.FORMAT, f"{path.name}: ffprobe failed: {tail}") from exc
    streams = meta.get("streams", [])
    video = next((s for s in streams if s.get("codec_type") == "video"), None)
    audio = next((s for s in streams if s.get("codec_type") == "audio"), None)
    if video is None:
        raise ItemFailure(FailureKind.FORMAT, f"{path.name}: no video stream")
    rate = video.get("avg_frame_rate") or video.get("r_frame_rate") or "0/1"
    fps = float(Fraction(rate)) if rate != "0/0" else 0.0
    duration = float(video.get("duration") or meta.get("format", {}).get("duration") or 0.0)
    frames = video.get("nb_frames")
    return MediaInfo(
        duration_s=duration,
        width=int(video["width"]),
        height=int(video["height"]),
        fps=fps,
        num_frames=int(frames) if frames and frames.isdigit() else None,
        has_audio=audio is not None,
        audio_sample_rate_hz=int(audio["sample_rate"]) if audio else None,
        audio_channels=int(audio.get("channels", 0)) if audio else None,
        video_codec=str(video.get("codec_name", "")),
    )


def iter_frames(
    path: Path, width: int, height: int, chunk: int = 32, fps: float | None = None
) -> Iterator[np.ndarray]:
    """Yield ``(n<=chunk, height, width, 3)`` uint8 RGB arrays, decoding as a stream.

    ``width``/``height`` must be the decoded size (from :func:`probe`); ``fps`` resamples.
    A decoder error after some frames raises ``ItemFailure(FORMAT)``.
    """
    stream = ffmpeg.input(str(path))
    if fps:
        stream = stream.filter("fps", fps=fps)
    args = (
        stream.output("pipe:", format="rawvideo", pix_fmt="rgb24")
        .global_args("-loglevel", "error", "-nostdin")
        .compile()
    )
    frame_bytes = width * height * 3
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        while True:
            buf = proc.stdout.read(frame_bytes * chunk)
            if not buf:
                break
            n = len(buf) // frame_bytes
            if n:
                yield np.frombuffer(buf[: n * frame_bytes], np.uint8).reshape(n, height, width, 3)
            if len(buf) < frame_bytes * chunk:
                break
    finally:
        if proc.stdout:
            proc.stdout.close()
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        code = proc.wait()
    if code != 0:
        raise ItemFailure(FailureKind.FORMAT, f"{path.name}: decode failed: {err.strip()[-300:]}")


class ReadAhead(Generic[T]):
    """Iterates ``items`` in a background thread, at most ``depth`` items ahead of the caller.

    For producers that wait outside the GIL (a decoder pipe): they run while the caller
    computes. The thread starts at construction, so a decoder starts before anything else
    the caller sets up. The producer's exceptions are raised in the caller; :meth:`close`
    (or leaving the ``with`` block) stops the producer and closes ``items``.
    """

    def __init__(self, items: Iterable[T], depth: int):
        self._slots: queue.Queue[tuple[bool, object]] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(
            target=self._produce, args=(items,), name="read-ahead", daemon=True
        )
        self._thread.start()

    def _put(self, entry: tuple[bool, object]) -> bool:
        while not self._stop.is_set():
            try:
                self._slots.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, items: Iterable[T]) -> None:
        it = iter(items)
        try:
            for item in it:
                if not self._put((True, item)):
                    return
            self._put((False, None))
        except BaseException as exc:  # handed to the caller, raised there
            self._put((False, exc))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> ReadAhead[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        more, item = self._slots.get()
        if not more:
            self._done = True
            if isinstance(item, BaseException):
                raise item
            raise StopIteration
        return item  # type: ignore[return-value]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> ReadAhead[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VideoWriter:
    """Streams RGB frames into an H.264 mp4 (optionally muxing a wav) through ffmpeg.

    ``crf`` 15–18 keeps crops visually lossless for training; yuv420p for compatibility.
    ``preset`` (x264's) trades file size for encoder CPU at the same ``crf``. With
    ``write_behind`` > 0, :meth:`write` queues up to that many arrays for a background thread
    that feeds the encoder, so the caller does not wait for it (do not modify an array after
    writing it).
    """

    def __init__(
        self,
        path: Path,
        width: int,
        height: int,
        fps: float,
        audio: Path | None = None,
        crf: int = 17,
        preset: str = "veryfast",
        write_behind: int = 0,
    ):
        video_in = ffmpeg.input(
            "pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", r=fps
        )
        streams = [video_in]
        out_kwargs: dict[str, object] = {
            "vcodec": "libx264",
            "pix_fmt": "yuv420p",
            "crf": crf,
            "preset": preset,
            "r": fps,
        }
        if audio is not None:
            streams.append(ffmpeg.input(str(audio)).audio)
            out_kwargs.update(acodec="aac", audio_bitrate="128k", shortest=None)
        args = (
            ffmpeg.output(*streams, str(path), **out_kwargs)
            .global_args("-loglevel", "error", "-nostdin")
            .overwrite_output()
            .compile()
        )
        self.path = path
        self.frames = 0
        self._proc = subprocess.Popen(args, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        self._pending: queue.Queue[np.ndarray | None] | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        if write_behind > 0:
            self._pending = queue.Queue(maxsize=write_behind)
            self._thread = threading.Thread(target=self._drain, name="video-writer", daemon=True)
            self._thread.start()

    def write(self, frames: np.ndarray) -> None:
        """Append ``(n, H, W, 3)`` or ``(H, W, 3)`` uint8 RGB frames."""
        arr = np.ascontiguousarray(frames, dtype=np.uint8)
        self.frames += 1 if arr.ndim == 3 else arr.shape[0]
        if self._pending is None:
            self._send(arr)
            return
        if self._error is not None:
            raise self._error
        self._pending.put(arr)

    def _send(self, arr: np.ndarray) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write(memoryview(arr).cast("B"))

    def _drain(self) -> None:
        assert self._pending is not None
        while (arr := self._pending.get()) is not None:
            if self._error is None:  # after a failure, keep emptying the queue
                try:
                    self._send(arr)
                except BaseException as exc:  # raised by write()/close() in the caller
                    self._error = exc

    def close(self) -> None:
        if self._pending is not None and self._thread is not None:
            self._pending.put(None)
            self._thread.join()
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.close()
        except BrokenPipeError as exc:
            self._error = self._error or exc
        err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
        if self._proc.wait() != 0:
            raise ItemFailure(FailureKind.FFMPEG, f"encode {self.path.name} failed: {err[-300:]}")
        if self._error is not None:
            raise self._error

    def abandon(self) -> None:
        """Stop the encoder without raising (after an error; the file is not to be used)."""
        self._proc.kill()
        if self._pending is not None and self._thread is not None:
            self._pending.put(None)  # the feeding thread drains: writes to a dead pipe fail
            self._thread.join()
        try:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
        except OSError:
            pass
        if self._proc.stderr is not None:
            self._proc.stderr.close()
        self._proc.wait()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:  # the caller's exception is the one to report, not the encoder's
            self.abandon()


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """Read a PCM s16 wav as float32 in [-1, 1], mono-mixed; returns (samples, rate_hz)."""
    with wave.open(str(path), "rb") as w:
        rate = w.getframerate()
        channels = w.getnchannels()
        width = w.getsampwidth()
        raw = w.readframes(w.getnframes())
    if width != 2:
        raise ItemFailure(FailureKind.FORMAT, f"{path.name}: expected 16-bit PCM, got {width * 8}")
    data = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    if channels > 1:
        data = data.reshape(-1, channels).mean(axis=1)
    return data, rate


def write_wav(path: Path, samples: np.ndarray, rate_hz: int) -> None:
    """Write mono float samples in [-1, 1] as 16-bit PCM."""
    pcm = np.clip(samples, -1.0, 1.0)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate_hz)
        w.writeframes((pcm * 32767.0).astype("<i2").tobytes())


def run_ffmpeg(args: list[str], what: str) -> None:
    """Run an ffmpeg argument list; failures become ``ItemFailure(FFMPEG)`` with stderr's tail."""
    proc = subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args],
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip()[-400:]
        raise ItemFailure(FailureKind.FFMPEG, f"{what}: {tail}")


def count_frames(path: Path) -> int:
    """Exact decoded frame count (decodes the stream; use on short clips and in tests)."""
    out = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-count_frames",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=nb_read_frames",
            "-of",
            "json",
            str(path),
        ],
        capture_output=True,
        check=True,
    )
    return int(json.loads(out.stdout)["streams"][0]["nb_read_frames"])
