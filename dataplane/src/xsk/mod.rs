//! AF_XDP I/O: the UMEM, one AF_XDP socket per (port, queue), the XDP filter that feeds them,
//! [`XskSender`] (the generator's transmit-only socket), and [`MemRing`], the in-memory
//! stand-in the worker's tests run over.
//!
//! # Safety boundary
//! This is the one module with unsafe code beyond `prefetch` (libxdp/libbpf calls and
//! xsk-rs's unsafe ring operations). The invariants:
//! * Every frame descriptor [`XskIo`] handles belongs to its own UMEM: it is one of the
//!   descriptors `Umem::new` returned, or one the kernel handed back on a ring of a socket
//!   bound to that UMEM. No other constructor of descriptors exists here.
//! * A frame is in exactly one place at a time: the free pool, a fill ring, the kernel's
//!   receive path, the worker's hands (between `receive` and `transmit`/`recycle`), a
//!   transmit ring, or the completion ring. In the worker's hands a frame is an
//!   [`XskFrame`]: a token that neither `Copy` nor `Clone` nor any constructor outside this
//!   module can make, and that `transmit` and `recycle` consume, so the borrow checker, not a
//!   convention, keeps a frame from being given back twice or made up. Only the worker's
//!   hands touch its bytes, through [`PacketIo::with_frame`] with `&mut` of the token, so no
//!   two borrows of one frame coexist and the kernel never writes a frame the worker reads.
//! * Every produce onto a ring is clamped to the ring's free slots (xsk-rs produces all or
//!   nothing), so no frame leaves the pool without reaching a ring.
//! * The filter's maps are written only with the key and value types `bpf/filter.c` declares.
//!
//! Adding a way to build a descriptor, to read a frame outside `with_frame`, or a map of
//! another type needs review against this list.

#![allow(unsafe_code)]

mod filter;
mod mem;
mod sender;

use std::ffi::CString;
use std::io;
use std::num::NonZeroU32;
use std::os::fd::AsRawFd;
use std::time::Duration;

use xsk_rs::config::{
    BindFlags, FrameSize, Interface, LibxdpFlags, QueueSize, SocketConfig, UmemConfig,
};
use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, TxQueue, Umem};

use crate::worker::{PacketIo, SocketStats};

pub use filter::{
    raise_memlock_limit, FilterAction, FilterCounts, FilterError, SteerKey, XdpFilter, XdpMode,
};
pub use mem::{MemFrame, MemRing};
pub use sender::XskSender;

/// Frames the kernel transmits per sendto() in copy mode (`MAX_PER_SOCKET_BUDGET` in
/// net/xdp/xsk.c).
const COPY_MODE_TX_BUDGET: usize = 32;

/// Starts the transmission of `queued` frames. Copy mode sends only inside sendto(), at most
/// [`COPY_MODE_TX_BUDGET`] frames per call: kick once per budget, or the ring fills and what
/// does not fit is dropped (46% of forwarded packets before this was so). Zero-copy needs a
/// kick only when the driver asks for one.
fn kick(tx: &TxQueue, queued: usize, copy_mode: bool) {
    let kicks = if copy_mode {
        queued.div_ceil(COPY_MODE_TX_BUDGET)
    } else {
        usize::from(queued > 0 && tx.needs_wakeup())
    };
    for _ in 0..kicks {
        // EAGAIN/EBUSY: the kernel is still sending; the next kick carries on.
        let _ = tx.wakeup();
    }
}

/// How a worker's sockets are set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XskConfig {
    /// Descriptors per ring (a power of two).
    pub ring_size: u32,
    /// Bytes per UMEM frame (2048 or 4096).
    pub frame_size: u32,
    /// Bind in zero-copy mode (fails on devices without it, such as veth) instead of copy.
    pub zero_copy: bool,
    /// Let the kernel sleep and be woken (XDP_USE_NEED_WAKEUP).
    pub need_wakeup: bool,
    /// Preferred busy polling (SO_PREFER_BUSY_POLL): the worker drives the device's receive
    /// from its own loop instead of interrupts; for a core dedicated to a worker.
    pub busy_poll: bool,
}

impl XskConfig {
    /// A UMEM of `frames` frames laid out for this configuration, and the frames' descriptors.
    fn umem(&self, frames: u32) -> Result<(Umem, Vec<FrameDesc>), XskError> {
        let bad = |e: &dyn core::fmt::Display| XskError::BadConfig(e.to_string());
        let ring = QueueSize::new(self.ring_size).map_err(|e| bad(&e))?;
        let frame_size = FrameSize::new(self.frame_size).map_err(|e| bad(&e))?;
        let umem_config = UmemConfig::builder()
            .frame_size(frame_size)
            .fill_queue_size(ring)
            .comp_queue_size(ring)
            .build()
            .map_err(|e| bad(&e))?;
        let frames =
            NonZeroU32::new(frames).ok_or_else(|| XskError::BadConfig("no frames".into()))?;
        raise_memlock_limit();
        Umem::new(umem_config, frames, false).map_err(|e| XskError::Umem(e.to_string()))
    }

    /// The sockets' configuration: rings of `ring_size`, copy or zero-copy, need_wakeup, and
    /// no libxdp program (xlb loads its own filter, or none for transmit-only sockets).
    fn socket(&self) -> Result<SocketConfig, XskError> {
        let ring =
            QueueSize::new(self.ring_size).map_err(|e| XskError::BadConfig(e.to_string()))?;
        let mut bind = if self.zero_copy {
            BindFlags::XDP_ZEROCOPY
        } else {
            BindFlags::XDP_COPY
        };
        if self.need_wakeup {
            bind |= BindFlags::XDP_USE_NEED_WAKEUP;
        }
        Ok(SocketConfig::builder()
            .rx_queue_size(ring)
            .tx_queue_size(ring)
            .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
            .bind_flags(bind)
            .build())
    }
}

impl Default for XskConfig {
    fn default() -> Self {
        Self {
            ring_size: 2048,
            frame_size: 4096,
            zero_copy: false,
            need_wakeup: true,
            busy_poll: false,
        }
    }
}

/// Why a worker's sockets could not be opened.
#[derive(Debug)]
pub enum XskError {
    /// No interface by that name.
    NoSuchInterface(String),
    /// A ring or frame size is not allowed.
    BadConfig(String),
    /// The UMEM could not be created (memory, privilege).
    Umem(String),
    /// The socket could not be bound (queue busy, no privilege, zero-copy unsupported).
    Socket {
        /// The interface.
        interface: String,
        /// The queue.
        queue: u32,
        /// Why.
        reason: String,
    },
    /// The XDP filter refused the socket.
    Filter(FilterError),
}

impl core::fmt::Display for XskError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoSuchInterface(name) => write!(f, "no interface named {name:?}"),
            Self::BadConfig(why) => write!(f, "bad AF_XDP configuration: {why}"),
            Self::Umem(why) => write!(f, "cannot create the UMEM: {why}"),
            Self::Socket {
                interface,
                queue,
                reason,
            } => write!(
                f,
                "cannot bind an AF_XDP socket to {interface} queue {queue}: {reason} \
                 (is another program bound there, or is this not run as root?)"
            ),
            Self::Filter(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for XskError {}

/// Sets preferred busy polling on an AF_XDP socket: 20 µs of polling, 64 frames a poll.
fn prefer_busy_poll(fd: std::os::fd::RawFd) -> io::Result<()> {
    // SO_PREFER_BUSY_POLL, SO_BUSY_POLL and SO_BUSY_POLL_BUDGET of <asm-generic/socket.h>.
    for (option, value) in [(69, 1), (libc::SO_BUSY_POLL, 20), (70, 64)] {
        let value: libc::c_int = value;
        let len = libc::socklen_t::try_from(core::mem::size_of::<libc::c_int>()).unwrap_or(4);
        // SAFETY: `value` lives across the call and `len` is its size; setsockopt only reads it.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                core::ptr::from_ref(&value).cast(),
                len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The parts of a bound socket: transmit and receive rings, and its fill and completion
/// rings when it has them.
type BoundSocket = (TxQueue, RxQueue, Option<(FillQueue, CompQueue)>);

/// How long a socket creation keeps trying a queue that is still busy.
const BUSY_QUEUE_WAIT: Duration = Duration::from_secs(2);

/// Creates an AF_XDP socket on `queue` of `interface` over `umem`, trying again for up to
/// [`BUSY_QUEUE_WAIT`] while the queue is busy: the kernel releases a queue asynchronously
/// after its socket closes, so a restarted xlb (or a second generator) binding at once can find
/// it still taken. Each (interface, queue) pair must be asked for once per UMEM, and the
/// configuration must inhibit libxdp's program load (xsk-rs's requirement for a shared UMEM).
fn bind_socket(
    config: SocketConfig,
    umem: &Umem,
    interface: &Interface,
    queue: u32,
) -> Result<BoundSocket, String> {
    let deadline = std::time::Instant::now() + BUSY_QUEUE_WAIT;
    loop {
        // SAFETY: the caller asks for each (interface, queue) pair once from this UMEM, with
        // the libxdp program load inhibited; a failed attempt binds nothing, so trying again
        // keeps that true.
        match unsafe { xsk_rs::Socket::new(config, umem, interface, queue) } {
            Ok(socket) => return Ok(socket),
            Err(e) => {
                let cause = std::error::Error::source(&e)
                    .and_then(|s| s.downcast_ref::<io::Error>())
                    .and_then(io::Error::raw_os_error);
                if cause == Some(libc::EBUSY) && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                let why = std::error::Error::source(&e).map_or(String::new(), |s| format!(": {s}"));
                return Err(format!("{e}{why}"));
            }
        }
    }
}

/// The interface index of `name`.
///
/// # Errors
/// [`XskError::NoSuchInterface`] when there is none.
pub fn interface_index(name: &str) -> Result<u32, XskError> {
    let c = CString::new(name).map_err(|_| XskError::NoSuchInterface(name.to_owned()))?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        return Err(XskError::NoSuchInterface(name.to_owned()));
    }
    Ok(index)
}

struct Port {
    tx: TxQueue,
    rx: RxQueue,
    fill: FillQueue,
    completion: CompQueue,
    /// Frames queued on the transmit ring since the last kick.
    queued: usize,
}

/// A received frame in the worker's hands (see the safety boundary above): made only by
/// [`XskIo`]'s `receive`, consumed by its `transmit` or `recycle`.
#[derive(Debug)]
pub struct XskFrame(FrameDesc);

/// One worker's AF_XDP sockets: one per port on the worker's queue, all over one UMEM, so
/// forwarding from a port to another moves a descriptor, not bytes.
pub struct XskIo {
    umem: Umem,
    ports: Vec<Port>,
    free: Vec<FrameDesc>,
    scratch: Vec<FrameDesc>,
    poll_fds: Vec<libc::pollfd>,
    /// Copy mode transmits only inside sendto(): kick after every loop that queued frames.
    kick_always: bool,
    /// Drive receive with a zero-timeout poll per port per loop (busy polling).
    busy_poll: bool,
}

impl core::fmt::Debug for XskIo {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("XskIo")
            .field("ports", &self.ports.len())
            .field("free", &self.free.len())
            .finish_non_exhaustive()
    }
}

impl XskIo {
    /// Opens a socket on `queue` of each interface in `interfaces` and binds it into the
    /// filter's socket map (the filter must be attached to each interface by the caller).
    ///
    /// # Errors
    /// See [`XskError`].
    pub fn open(
        interfaces: &[String],
        queue: u32,
        config: &XskConfig,
        filter: &XdpFilter,
    ) -> Result<Self, XskError> {
        let ports_n = u32::try_from(interfaces.len().max(1)).unwrap_or(1);
        // Per port: a full fill ring and a full transmit ring in flight.
        let (umem, free) =
            config.umem(ports_n.saturating_mul(config.ring_size).saturating_mul(2))?;
        let socket_config = config.socket()?;
        let mut ports = Vec::with_capacity(interfaces.len());
        for (slot, name) in interfaces.iter().enumerate() {
            let ifindex = interface_index(name)?;
            let interface: Interface = name
                .parse()
                .map_err(|_| XskError::NoSuchInterface(name.clone()))?;
            let socket_error = |reason: String| XskError::Socket {
                interface: name.clone(),
                queue,
                reason,
            };
            let (tx, rx, rings) =
                bind_socket(socket_config, &umem, &interface, queue).map_err(socket_error)?;
            let (fill, completion) =
                rings.ok_or_else(|| socket_error("no fill and completion rings".into()))?;
            if config.busy_poll {
                prefer_busy_poll(rx.fd().as_raw_fd())
                    .map_err(|e| socket_error(format!("busy polling: {e}")))?;
            }
            filter
                .bind_socket(
                    ifindex,
                    u32::try_from(slot).unwrap_or(u32::MAX),
                    queue,
                    rx.fd().as_raw_fd(),
                )
                .map_err(XskError::Filter)?;
            ports.push(Port {
                tx,
                rx,
                fill,
                completion,
                queued: 0,
            });
        }
        let poll_fds = ports
            .iter()
            .map(|p| libc::pollfd {
                fd: p.rx.fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let mut io = Self {
            umem,
            ports,
            scratch: vec![FrameDesc::default(); config.ring_size as usize],
            free,
            poll_fds,
            kick_always: !config.zero_copy,
            busy_poll: config.busy_poll,
        };
        io.refill();
        Ok(io)
    }

    /// Frames in the free pool (for tests of the frame accounting).
    #[must_use]
    pub fn free_frames(&self) -> usize {
        self.free.len()
    }

    fn refill(&mut self) {
        let ports = self.ports.len().max(1);
        for port in &mut self.ports {
            // Share the pool between the ports' fill rings.
            let want = u32::try_from(self.free.len().div_ceil(ports)).unwrap_or(u32::MAX);
            let n = (port.fill.nb_free(want).min(want) as usize).min(self.free.len());
            if n > 0 {
                let from = self.free.len() - n;
                // SAFETY: the descriptors come from the free pool of this UMEM, and `n` is
                // clamped to the ring's free slots, so all of them are produced.
                let produced = unsafe { port.fill.produce(&self.free[from..]) };
                if produced == n {
                    self.free.truncate(from);
                }
            }
            if port.fill.needs_wakeup() {
                let _ = port.fill.wakeup(port.rx.fd_mut(), 0);
            }
        }
    }
}

impl PacketIo for XskIo {
    type Frame = XskFrame;

    fn port_count(&self) -> usize {
        self.ports.len()
    }

    fn receive(&mut self, port: usize, into: &mut Vec<XskFrame>, max: usize) -> usize {
        let Some(port) = self.ports.get_mut(port) else {
            return 0;
        };
        let max = max.min(self.scratch.len());
        // SAFETY: the ring is of a socket bound to this UMEM, so the descriptors it yields
        // name frames of this UMEM, now in the worker's hands (as tokens, below).
        let n = unsafe { port.rx.consume(&mut self.scratch[..max]) };
        into.extend(self.scratch[..n].iter().map(|d| XskFrame(*d)));
        n
    }

    fn with_frame<R>(
        &mut self,
        frame: &mut XskFrame,
        f: impl FnOnce(&mut [u8], usize) -> (usize, R),
    ) -> R {
        let desc = &mut frame.0;
        let len = desc.lengths().data();
        // SAFETY: `desc` names a frame of this UMEM in the worker's hands (a token that
        // `receive` made and nothing has consumed), and the `&mut` borrow of the token is the
        // only access.
        let mut data = unsafe { self.umem.data_mut(desc) };
        // Open the whole frame for refusals that grow the packet, then set the final length.
        data.cursor().set_pos(usize::MAX);
        let (new_len, out) = f(data.contents_mut(), len);
        data.cursor().set_pos(new_len);
        out
    }

    fn transmit(&mut self, port: usize, queue: &mut Vec<XskFrame>) -> usize {
        let Some(port) = self.ports.get_mut(port) else {
            return 0;
        };
        let want = u32::try_from(queue.len()).unwrap_or(u32::MAX);
        let n = (port.tx.nb_free(want).min(want) as usize).min(self.scratch.len());
        if n == 0 {
            return 0;
        }
        for (slot, frame) in self.scratch.iter_mut().zip(queue.iter()) {
            *slot = frame.0;
        }
        // SAFETY: the frames are of this UMEM and in the worker's hands; `n` is clamped to the
        // ring's free slots so every one of them is produced, and their tokens are consumed
        // right after.
        let produced = unsafe { port.tx.produce(&self.scratch[..n]) };
        queue.drain(..produced);
        port.queued += produced;
        produced
    }

    fn recycle(&mut self, frames: &mut Vec<XskFrame>) {
        self.free.extend(frames.drain(..).map(|f| f.0));
    }

    fn socket_stats(&self, port: usize) -> Option<SocketStats> {
        let s = self.ports.get(port)?.rx.fd().xdp_statistics().ok()?;
        Some(SocketStats {
            rx_dropped: s.rx_dropped(),
            rx_invalid_descs: s.rx_invalid_descs(),
            rx_ring_full: s.rx_ring_full(),
            rx_fill_ring_empty_descs: s.rx_fill_ring_empty_descs(),
            tx_invalid_descs: s.tx_invalid_descs(),
            tx_ring_empty_descs: s.tx_ring_empty_descs(),
        })
    }

    fn flush(&mut self) {
        for port in &mut self.ports {
            kick(&port.tx, port.queued, self.kick_always);
            port.queued = 0;
            // SAFETY: the completion ring belongs to a socket of this UMEM; the frames it
            // returns were transmitted by us and go back to the free pool.
            let n = unsafe { port.completion.consume(&mut self.scratch) };
            self.free.extend_from_slice(&self.scratch[..n]);
            if self.busy_poll {
                // With SO_PREFER_BUSY_POLL, this is what runs the device's receive.
                let _ = port.rx.poll(0);
            }
        }
        self.refill();
    }

    fn wait(&mut self, timeout: Duration) {
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        let n = libc::nfds_t::try_from(self.poll_fds.len()).unwrap_or(0);
        // SAFETY: `poll_fds` is a live array of `n` pollfd structs that poll may write.
        let _ = unsafe { libc::poll(self.poll_fds.as_mut_ptr(), n, ms) };
    }
}
