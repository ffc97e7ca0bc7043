"""How bytes move between host and device: one copy engine for the streamer and the homes.

On a CPU device a copy is a plain ``copy_`` (a memcpy, or a cast). On CUDA, copies *to* the
device run on one stream and copies *from* it on another (a load and a write-back overlap), both
from pinned host memory, never on the compute stream. Ordering uses events:

* a slot's working copy is only refilled after the compute that read it: every ``release``
  records an event on the compute stream, and the next load into that slot makes the copy
  stream wait for it (``after``) before its copy is queued;
* a load ends with an event on the copy stream that the compute stream waits for at
  ``acquire``; the loader thread also waits for it on the host (``settle``), so ``read_s``
  measures the transfer, not its queueing, and a staging buffer is never refilled while its
  previous copy out of it is still running;
* a write-back waits for the release event, copies out, and synchronizes before the bytes
  are written to their home.
"""

from __future__ import annotations

import contextlib

import torch


class Copier:
    """The copy engine of one streamer (``device`` is where slots and device masters live)."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._h2d = torch.cuda.Stream(self.device) if self.cuda else None
        self._d2h = torch.cuda.Stream(self.device) if self.cuda else None

    # -------------------------------------------------------------- events
    def compute_done(self):
        """An event after everything queued so far on the compute stream (None on CPU)."""
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def after(self, event) -> None:
        """Order the copies queued from now on (both directions) after ``event``."""
        if event is not None:
            self._h2d.wait_event(event)
            self._d2h.wait_event(event)

    def loaded(self):
        """An event after the copies to the device queued so far (None on CPU)."""
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(self._h2d)
        return ev

    @staticmethod
    def settle(event) -> None:
        """Block this (host) thread until ``event`` has happened."""
        if event is not None:
            event.synchronize()

    def use(self, event) -> None:
        """Make the compute stream wait for ``event`` (a load) before it reads the slot."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    # -------------------------------------------------------------- copies
    def loading(self):
        """A context in which device work runs on the copy stream towards the device (a gather)."""
        return self._stream(self._h2d)

    def copy_in(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """``dst.copy_(src)`` towards the device (a cast when the dtypes differ); asynchronous on CUDA."""
        if _same_memory(dst, src):
            return  # zero copy: the staging bytes are the working copy
        with self._stream(self._h2d):
            dst.copy_(src, non_blocking=self.cuda)

    def copy_out(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """``dst.copy_(src)`` away from the device; returns when ``dst`` holds the bytes."""
        if _same_memory(dst, src):
            return
        with self._stream(self._d2h):
            dst.copy_(src, non_blocking=self.cuda)
        if self.cuda:
            self._d2h.synchronize()

    def _stream(self, stream):
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.dtype == b.dtype and a.data_ptr() == b.data_ptr() and a.numel() == b.numel()
