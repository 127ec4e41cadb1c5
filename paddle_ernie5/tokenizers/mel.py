"""Log-mel features of 16 kHz speech and their inversion to a waveform (numpy only).

    log_mel(waves_BT)               -> [B, T // HOP, N_MELS] float32  natural log of a magnitude mel
    mel_to_wave(log_mel_BMN, iters) -> [B, M * HOP] float32           fast Griffin-Lim

Frame m covers samples centred on m * HOP (the signal is reflect-padded by N_FFT // 2), so a wave
of T samples gives exactly T // HOP frames and M frames invert to M * HOP samples: lengths line up
with the codec's frames (HOP divides its samples per frame).

Inversion: the mel magnitude is mapped back to a linear spectrogram by a non-negative least-squares
fit (pseudo-inverse start, multiplicative updates), then the phase is recovered by Griffin-Lim with
momentum (Perraudin et al., 2013, "fast Griffin-Lim"). The result is a little phasey but needs no
trained vocoder, which is why the codec predicts mel and not waveform samples.
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16000
N_FFT = 512
HOP = 160  # 10 ms: 100 mel frames per second
N_MELS = 80
LOG_FLOOR = 1e-2  # about 85 dB below the loudest bins of a peak-normalised utterance
_BINS = N_FFT // 2 + 1


def _hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def _mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


def mel_filterbank(n_mels: int = N_MELS) -> np.ndarray:
    """[n_mels, N_FFT // 2 + 1] triangular HTK-scale filters with unit peak, 0 .. 8 kHz."""
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(SAMPLE_RATE / 2), n_mels + 2))
    freqs = np.linspace(0.0, SAMPLE_RATE / 2, _BINS)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - lo) / (mid - lo)
    down = (hi - freqs[None]) / (hi - mid)
    return np.maximum(0.0, np.minimum(up, down)).astype(np.float32)


# Periodic Hann window.
_WINDOW = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)
_FB = mel_filterbank()


def stft(waves_BT: np.ndarray) -> np.ndarray:
    """Complex [B, T // HOP, BINS] of centred, Hann-windowed frames."""
    waves_BT = np.atleast_2d(np.asarray(waves_BT, np.float32))
    n_frames = waves_BT.shape[1] // HOP
    padded = np.pad(waves_BT, ((0, 0), (N_FFT // 2, N_FFT // 2)), mode="reflect")
    idx = np.arange(n_frames)[:, None] * HOP + np.arange(N_FFT)[None]
    return np.fft.rfft(padded[:, idx] * _WINDOW, axis=-1)


def istft(spec_BMK: np.ndarray) -> np.ndarray:
    """Weighted overlap-add inverse of `stft`: [B, M, BINS] -> [B, M * HOP]."""
    b, m, _ = spec_BMK.shape
    hops = -(-N_FFT // HOP)  # frame m spans hops m .. m + hops - 1 of the padded signal
    frames = np.fft.irfft(spec_BMK, n=N_FFT, axis=-1).astype(np.float32) * _WINDOW
    chunks = np.pad(frames, ((0, 0), (0, 0), (0, hops * HOP - N_FFT))).reshape(b, m, hops, HOP)
    wsq = np.pad(_WINDOW**2, (0, hops * HOP - N_FFT)).reshape(hops, HOP)
    out = np.zeros((b, m + hops - 1, HOP), np.float32)
    norm = np.zeros((m + hops - 1, HOP), np.float32)
    for k in range(hops):  # overlap-add as `hops` shifted adds instead of a loop over frames
        out[:, k : k + m] += chunks[:, :, k]
        norm[k : k + m] += wsq[k]
    out = (out / np.maximum(norm, 1e-8)).reshape(b, -1)
    return out[:, N_FFT // 2 : N_FFT // 2 + m * HOP]


def log_mel(waves_BT: np.ndarray) -> np.ndarray:
    """[B, T // HOP, N_MELS] float32 log magnitude-mel, floored at log(LOG_FLOOR)."""
    mag = np.abs(stft(waves_BT)).astype(np.float32)
    return np.log(np.maximum(mag @ _FB.T, LOG_FLOOR)).astype(np.float32)


def mel_to_magnitude(log_mel_BMN: np.ndarray, iters: int = 20) -> np.ndarray:
    """Non-negative linear magnitude [B, M, BINS] whose mel projection fits exp(log_mel)."""
    mel = np.exp(np.asarray(log_mel_BMN, np.float32))
    mel = np.where(mel <= LOG_FLOOR * 1.0001, 0.0, mel).astype(np.float32)  # floored bins: silence
    mag = np.maximum(mel @ np.linalg.pinv(_FB).T, 1e-6).astype(np.float32)
    gram = _FB.T @ _FB
    target = mel @ _FB
    for _ in range(iters):  # Lee-Seung updates keep mag >= 0 and decrease ||mag @ FB.T - mel||^2
        mag *= target / np.maximum(mag @ gram, 1e-8)
    return mag


def mel_to_wave(
    log_mel_BMN: np.ndarray, iters: int = 32, momentum: float = 0.99, seed: int = 0
) -> np.ndarray:
    """Waveforms [B, M * HOP] whose log-mel approximates the input: NNLS magnitude + fast
    Griffin-Lim."""
    mag = mel_to_magnitude(log_mel_BMN)
    rng = np.random.default_rng(seed)
    angles = np.exp(2j * np.pi * rng.random(mag.shape)).astype(np.complex64)
    prev = np.zeros_like(angles)
    for _ in range(iters):
        rebuilt = stft(istft(mag * angles))
        accel = rebuilt - (momentum / (1 + momentum)) * prev if momentum else rebuilt
        prev = rebuilt
        angles = accel / np.maximum(np.abs(accel), 1e-8)
    wave = istft(mag * angles)
    peak = np.abs(wave).max(axis=1, keepdims=True)
    return np.where(peak > 1.0, wave / np.maximum(peak, 1e-8), wave).astype(np.float32)
