//! `XskSender`: a transmit-only AF_XDP socket for the traffic generator. Frames are written
//! once, then sent over and over: a completed frame keeps its bytes, and its length (which
//! xsk-rs resets on completion) is set again before it is reused.

use xsk_rs::config::Interface;
use xsk_rs::{CompQueue, FrameDesc, RxQueue, TxQueue, Umem};

use super::{bind_socket, interface_index, kick, XskConfig, XskError};

/// A transmit-only AF_XDP socket over its own UMEM of pre-written frames.
pub struct XskSender {
    umem: Umem,
    tx: TxQueue,
    completion: CompQueue,
    /// Kept so the socket stays whole; nothing is ever steered to it.
    _rx: RxQueue,
    free: Vec<FrameDesc>,
    /// Each frame's length, by frame number (address / frame size).
    lengths: Vec<usize>,
    frame_size: usize,
    scratch: Vec<FrameDesc>,
    kick_always: bool,
}

impl core::fmt::Debug for XskSender {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("XskSender")
            .field("free", &self.free.len())
            .finish_non_exhaustive()
    }
}

impl XskSender {
    /// Opens a sender on `queue` of `interface` with `frames` frames, each written by
    /// `write(i, buf)`, which returns the frame's length.
    ///
    /// # Errors
    /// See [`XskError`].
    pub fn open(
        interface: &str,
        queue: u32,
        config: &XskConfig,
        frames: u32,
        mut write: impl FnMut(usize, &mut [u8]) -> usize,
    ) -> Result<Self, XskError> {
        interface_index(interface)?;
        let (umem, mut free) = config.umem(frames)?;
        let socket_config = config.socket()?;
        let name: Interface = interface
            .parse()
            .map_err(|_| XskError::NoSuchInterface(interface.to_owned()))?;
        // The (interface, queue) pair is bound once from this new UMEM, with the libxdp
        // program load inhibited (the configuration's).
        let (tx, rx, rings) =
            bind_socket(socket_config, &umem, &name, queue).map_err(|reason| XskError::Socket {
                interface: interface.to_owned(),
                queue,
                reason,
            })?;
        let (_fill, completion) = rings.ok_or_else(|| XskError::Socket {
            interface: interface.to_owned(),
            queue,
            reason: "no fill and completion rings".into(),
        })?;
        let frame_size = config.frame_size as usize;
        let mut lengths = vec![0; frames as usize];
        for (i, desc) in free.iter_mut().enumerate() {
            // SAFETY: the descriptor is one `Umem::new` just returned, held by nobody else;
            // the kernel has seen none of them yet.
            let mut data = unsafe { umem.data_mut(desc) };
            data.cursor().set_pos(usize::MAX);
            let len = write(i, data.contents_mut());
            data.cursor().set_pos(len);
            lengths[desc.addr() / frame_size] = len;
        }
        Ok(Self {
            umem,
            tx,
            completion,
            _rx: rx,
            free,
            lengths,
            frame_size,
            scratch: vec![FrameDesc::default(); config.ring_size as usize],
            kick_always: !config.zero_copy,
        })
    }

    /// Queues up to `max` frames for transmission, kicks the kernel, and takes completed
    /// frames back. Returns how many frames were queued.
    pub fn send(&mut self, max: usize) -> usize {
        let done = self.reap();
        for desc in &mut self.scratch[..done] {
            // Completion reset the length to 0; the bytes are still the ones written at open.
            let len = self.lengths[desc.addr() / self.frame_size];
            // SAFETY: the frame has just come back on the completion ring: the kernel is done
            // with it and only this `&mut` reaches it.
            unsafe { self.umem.data_mut(desc) }.cursor().set_pos(len);
        }
        self.free.extend_from_slice(&self.scratch[..done]);
        self.queue(max, None::<fn(&mut [u8]) -> usize>)
    }

    /// Like [`XskSender::send`], but `write` rewrites each frame just before it is queued
    /// (and returns its length): a new flow per packet, a timestamp.
    pub fn send_with(&mut self, max: usize, write: impl FnMut(&mut [u8]) -> usize) -> usize {
        let done = self.reap();
        self.free.extend_from_slice(&self.scratch[..done]);
        self.queue(max, Some(write))
    }

    /// Takes completed frames into `scratch`; returns how many.
    fn reap(&mut self) -> usize {
        // SAFETY: the completion ring is this socket's; its frames are ours and done.
        unsafe { self.completion.consume(&mut self.scratch) }
    }

    /// Queues up to `max` free frames (rewritten by `write` first, if given) and kicks.
    fn queue(&mut self, max: usize, mut write: Option<impl FnMut(&mut [u8]) -> usize>) -> usize {
        let want = u32::try_from(max.min(self.free.len())).unwrap_or(u32::MAX);
        let n = self.tx.nb_free(want).min(want) as usize;
        let mut queued = 0;
        if n > 0 {
            let from = self.free.len() - n;
            if let Some(write) = write.as_mut() {
                for desc in &mut self.free[from..] {
                    // SAFETY: a free frame of this UMEM (never queued, or back from
                    // completion): neither the kernel nor anyone else reaches it while this
                    // `&mut` lives.
                    let mut data = unsafe { self.umem.data_mut(desc) };
                    data.cursor().set_pos(usize::MAX);
                    let len = write(data.contents_mut());
                    data.cursor().set_pos(len);
                }
            }
            // SAFETY: the frames come from this UMEM's free pool, and `n` is clamped to the
            // ring's free slots, so all are produced.
            queued = unsafe { self.tx.produce(&self.free[from..]) };
            self.free.truncate(self.free.len() - queued);
        }
        // At least one kick per call, so that a call queueing nothing still pushes what an
        // earlier kick left in the ring (the generator's drain loop at the end relies on it).
        kick(&self.tx, queued.max(1), self.kick_always);
        queued
    }

    /// Frames not in flight.
    #[must_use]
    pub fn free_frames(&self) -> usize {
        self.free.len()
    }
}
