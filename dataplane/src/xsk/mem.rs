//! `MemRing`: an in-memory [`PacketIo`] for tests and benchmarks — the worker loop runs over it
//! exactly as over AF_XDP rings, with a fixed frame pool whose every frame is accounted for.

use std::collections::VecDeque;
use std::time::Duration;

use crate::worker::{PacketIo, SocketStats};

/// A received frame of a [`MemRing`]'s pool in the worker's hands: made only by the ring's
/// `receive`, consumed by its `transmit` or `recycle` (see [`PacketIo::Frame`]).
#[derive(Debug, PartialEq, Eq)]
pub struct MemFrame {
    index: u32,
    len: u32,
}

/// In-memory ports over one frame pool: frames are injected into a port's receive queue and
/// collected from its transmit queue.
#[derive(Debug)]
pub struct MemRing {
    frames: Vec<Box<[u8]>>,
    free: Vec<u32>,
    rx: Vec<VecDeque<MemFrame>>,
    tx: Vec<Vec<MemFrame>>,
    tx_room: usize,
    flushes: u64,
}

impl MemRing {
    /// `ports` ports over a pool of `frames` frames of `frame_size` bytes; a transmit queue
    /// takes at most `tx_room` frames between two [`MemRing::transmitted`] calls.
    #[must_use]
    pub fn new(ports: usize, frames: u32, frame_size: usize, tx_room: usize) -> Self {
        Self {
            frames: (0..frames)
                .map(|_| vec![0; frame_size].into_boxed_slice())
                .collect(),
            free: (0..frames).rev().collect(),
            rx: (0..ports).map(|_| VecDeque::new()).collect(),
            tx: (0..ports).map(|_| Vec::new()).collect(),
            tx_room,
            flushes: 0,
        }
    }

    /// Puts a copy of `bytes` on `port`'s receive queue. Returns false (and injects nothing)
    /// when the pool has no free frame or the bytes do not fit a frame.
    pub fn inject(&mut self, port: usize, bytes: &[u8]) -> bool {
        let Some(index) = self.free.pop() else {
            return false;
        };
        let frame = &mut self.frames[index as usize];
        if bytes.len() > frame.len() || port >= self.rx.len() {
            self.free.push(index);
            return false;
        }
        frame[..bytes.len()].copy_from_slice(bytes);
        self.rx[port].push_back(MemFrame {
            index,
            len: u32::try_from(bytes.len()).unwrap_or(u32::MAX),
        });
        true
    }

    /// Takes the frames transmitted on `port` so far, as bytes, and frees them.
    pub fn transmitted(&mut self, port: usize) -> Vec<Vec<u8>> {
        let descs = std::mem::take(&mut self.tx[port]);
        let out = descs
            .iter()
            .map(|d| self.frames[d.index as usize][..d.len as usize].to_vec())
            .collect();
        self.free.extend(descs.iter().map(|d| d.index));
        out
    }

    /// Frees the frames transmitted on `port` without looking at them (for benchmarks);
    /// returns how many there were.
    pub fn discard_transmitted(&mut self, port: usize) -> usize {
        let n = self.tx[port].len();
        let Self { tx, free, .. } = self;
        free.extend(tx[port].drain(..).map(|d| d.index));
        n
    }

    /// Frames in the pool that nobody holds (neither queued nor in a worker's hands).
    #[must_use]
    pub fn free_frames(&self) -> usize {
        self.free.len()
    }

    /// How many times the worker flushed.
    #[must_use]
    pub fn flushes(&self) -> u64 {
        self.flushes
    }
}

impl PacketIo for MemRing {
    type Frame = MemFrame;

    fn port_count(&self) -> usize {
        self.rx.len()
    }

    fn receive(&mut self, port: usize, into: &mut Vec<MemFrame>, max: usize) -> usize {
        let queue = &mut self.rx[port];
        let n = max.min(queue.len());
        into.extend(queue.drain(..n));
        n
    }

    fn with_frame<R>(
        &mut self,
        frame: &mut MemFrame,
        f: impl FnOnce(&mut [u8], usize) -> (usize, R),
    ) -> R {
        let buf = &mut self.frames[frame.index as usize];
        let (len, out) = f(buf, frame.len as usize);
        frame.len = u32::try_from(len.min(buf.len())).unwrap_or(u32::MAX);
        out
    }

    fn transmit(&mut self, port: usize, queue: &mut Vec<MemFrame>) -> usize {
        let room = self.tx_room.saturating_sub(self.tx[port].len());
        let n = room.min(queue.len());
        self.tx[port].extend(queue.drain(..n));
        n
    }

    fn recycle(&mut self, frames: &mut Vec<MemFrame>) {
        self.free.extend(frames.drain(..).map(|f| f.index));
    }

    fn flush(&mut self) {
        self.flushes += 1;
    }

    fn wait(&mut self, _timeout: Duration) {}

    fn socket_stats(&self, _port: usize) -> Option<SocketStats> {
        None
    }
}
