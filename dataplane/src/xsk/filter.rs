//! The XDP filter (`dataplane/bpf/filter.c`): loading it from the bytes embedded at build
//! time, attaching it to ports, binding AF_XDP sockets into its `xsks` map, and keeping its
//! `steer` map equal to the set of keys a snapshot needs.

use std::collections::HashSet;
use std::ffi::CStr;
use std::io;
use std::os::fd::RawFd;
use std::ptr::NonNull;

use libxdp_sys as sys;

use crate::packet::{Endpoint, Family, IpProto};

/// The compiled filter, built by build.rs.
static FILTER_OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/filter.o"));

/// How the filter is attached to a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    /// Generic XDP, after the kernel has built an skb: works on every device.
    Skb,
    /// Native XDP in the driver (veth supports it).
    Native,
}

impl XdpMode {
    /// `XDP_FLAGS_SKB_MODE` and `XDP_FLAGS_DRV_MODE` of `<linux/if_link.h>`.
    fn flags(self) -> u32 {
        match self {
            Self::Skb => 1 << 1,
            Self::Native => 1 << 2,
        }
    }
}

/// Why the filter could not be loaded or changed.
#[derive(Debug)]
pub enum FilterError {
    /// libbpf refused to open or load the object (the kernel's verifier, missing privilege).
    Load(io::Error),
    /// The object lacks a program or a map this code expects (a build mismatch).
    Missing(&'static str),
    /// Attaching to the port failed.
    Attach {
        /// The port's interface index.
        ifindex: u32,
        /// Why.
        error: io::Error,
    },
    /// A map update failed.
    Map(io::Error),
}

impl core::fmt::Display for FilterError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Load(e) => write!(f, "cannot load the XDP filter: {e}"),
            Self::Missing(what) => write!(f, "the XDP filter object has no {what}"),
            Self::Attach { ifindex, error } => {
                write!(
                    f,
                    "cannot attach the XDP filter to interface index {ifindex}: {error}"
                )
            }
            Self::Map(e) => write!(f, "cannot update the XDP filter's map: {e}"),
        }
    }
}

impl std::error::Error for FilterError {}

/// The filter's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FilterCounts {
    /// Redirected to an AF_XDP socket.
    pub redirected: u64,
    /// Passed to the kernel: not xlb's.
    pub passed: u64,
    /// xlb's, but passed to the kernel because no socket is bound for the receiving queue
    /// (more queues than workers, say).
    pub unbound: u64,
}

/// What the filter does with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterAction {
    /// To xlb (redirected to the queue's socket when one is bound).
    Steer,
    /// To the kernel.
    Pass,
}

/// A key of the filter's `steer` map. Must match `struct steer_key` in `bpf/filter.c`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct SteerKey {
    addr: [u8; 16],
    port: [u8; 2],
    proto: u8,
    flags: u8,
}

/// Socket slots per port in the `xsks` map (`XSK_QUEUES` in `bpf/filter.c`).
const XSK_QUEUES: u32 = 64;

const STEER_SOURCE: u8 = 1;
const STEER_IPV6: u8 = 2;
const STEER_ANY_PORT: u8 = 4;
const STEER_VIP_ADDR: u8 = 8;

impl SteerKey {
    fn new(family: Family, addr: [u8; 16], port: u16, proto: IpProto, flags: u8) -> Self {
        let family = match family {
            Family::Ipv4 => 0,
            Family::Ipv6 => STEER_IPV6,
        };
        Self {
            addr,
            port: port.to_be_bytes(),
            proto: proto.0,
            flags: flags | family,
        }
    }

    /// Packets to this Service address, port and protocol.
    #[must_use]
    pub fn destination(to: &Endpoint, proto: IpProto) -> Self {
        Self::new(to.family(), *to.key_addr(), to.port(), proto, 0)
    }

    /// Packets from this backend address, port and protocol (dnat-mode replies).
    #[must_use]
    pub fn source(from: &Endpoint, proto: IpProto) -> Self {
        Self::new(
            from.family(),
            *from.key_addr(),
            from.port(),
            proto,
            STEER_SOURCE,
        )
    }

    /// Whether this key matches a source (a backend's replies) rather than a destination.
    #[must_use]
    pub fn is_source(&self) -> bool {
        self.flags & STEER_SOURCE != 0
    }

    /// Malformed packets to this Service address (any port, any protocol), which the kernel
    /// would drop silently and xlb's parser counts by reason.
    #[must_use]
    pub fn vip_address(family: Family, addr: [u8; 16]) -> Self {
        Self::new(family, addr, 0, IpProto(0), STEER_VIP_ADDR)
    }

    /// Fragments after the first from this backend address (any port, any protocol): the
    /// later fragments of its fragmented replies, which carry no ports to match.
    #[must_use]
    pub fn source_address(family: Family, addr: [u8; 16]) -> Self {
        Self::new(family, addr, 0, IpProto(0), STEER_SOURCE | STEER_ANY_PORT)
    }

    /// Packets to this address with any port (an SNAT address: snat-mode replies).
    #[must_use]
    pub fn any_port(family: Family, addr: [u8; 16], proto: IpProto) -> Self {
        Self::new(family, addr, 0, proto, STEER_ANY_PORT)
    }
}

/// The loaded filter. Dropping it detaches it from every port it was attached to.
#[derive(Debug)]
pub struct XdpFilter {
    object: NonNull<sys::bpf_object>,
    program: RawFd,
    steer: RawFd,
    xsks: RawFd,
    port_base: RawFd,
    link_ports: RawFd,
    stats: RawFd,
    attached: Vec<(u32, XdpMode)>,
    steered: HashSet<SteerKey>,
}

// SAFETY: the bpf_object is only touched through `&mut self` (attach, drop) or read-only map
// file descriptors, and libbpf keeps no thread-local state about it.
unsafe impl Send for XdpFilter {}

impl XdpFilter {
    /// Loads the filter into the kernel (not yet attached anywhere).
    ///
    /// # Errors
    /// [`FilterError::Load`] when the kernel refuses it (no privilege, no BPF), or
    /// [`FilterError::Missing`] when the object is not the one this code expects.
    pub fn load() -> Result<Self, FilterError> {
        raise_memlock_limit();
        // SAFETY: the buffer is a valid, 'static slice; libbpf copies what it keeps.
        let object = unsafe {
            sys::bpf_object__open_mem(
                FILTER_OBJECT.as_ptr().cast(),
                FILTER_OBJECT.len(),
                core::ptr::null(),
            )
        };
        let object =
            NonNull::new(object).ok_or_else(|| FilterError::Load(io::Error::last_os_error()))?;
        // SAFETY: `object` was just opened by libbpf and is not loaded yet.
        let err = unsafe { sys::bpf_object__load(object.as_ptr()) };
        let filter = |program, steer, xsks, stats| Self {
            object,
            program,
            steer,
            xsks,
            port_base: -1,
            link_ports: -1,
            stats,
            attached: Vec::new(),
            steered: HashSet::new(),
        };
        if err != 0 {
            // Close it through Drop; nothing is attached yet.
            drop(filter(-1, -1, -1, -1));
            return Err(FilterError::Load(io::Error::from_raw_os_error(-err)));
        }
        let mut this = filter(-1, -1, -1, -1);
        // SAFETY: `object` is loaded; the name is a valid C string.
        let program = unsafe {
            sys::bpf_object__find_program_by_name(object.as_ptr(), c"xlb_filter".as_ptr())
        };
        if program.is_null() {
            return Err(FilterError::Missing("program xlb_filter"));
        }
        // SAFETY: `program` belongs to the loaded `object`, which outlives this call.
        this.program = unsafe { sys::bpf_program__fd(program) };
        this.steer = this.map_fd(c"steer")?;
        this.xsks = this.map_fd(c"xsks")?;
        this.stats = this.map_fd(c"stats")?;
        this.port_base = this.map_fd(c"port_base")?;
        this.link_ports = this.map_fd(c"link_ports")?;
        Ok(this)
    }

    fn map_fd(&self, name: &'static CStr) -> Result<RawFd, FilterError> {
        // SAFETY: `object` is loaded and alive as long as `self`; the name is a C string.
        let fd =
            unsafe { sys::bpf_object__find_map_fd_by_name(self.object.as_ptr(), name.as_ptr()) };
        if fd < 0 {
            return Err(FilterError::Missing("map"));
        }
        Ok(fd)
    }

    /// Attaches the filter to the port `ifindex`, replacing any XDP program left there (by an
    /// xlb that crashed, say).
    ///
    /// # Errors
    /// [`FilterError::Attach`] when the kernel refuses (no such device, mode unsupported).
    pub fn attach(&mut self, ifindex: u32, mode: XdpMode) -> Result<(), FilterError> {
        let index = i32::try_from(ifindex).map_err(|_| FilterError::Attach {
            ifindex,
            error: io::Error::from(io::ErrorKind::InvalidInput),
        })?;
        for leftover in [XdpMode::Skb, XdpMode::Native] {
            // SAFETY: a plain syscall wrapper; a failure (nothing attached) is harmless.
            let _ = unsafe { sys::bpf_xdp_detach(index, leftover.flags(), core::ptr::null()) };
        }
        // SAFETY: `program` is the fd of our loaded program, alive as long as `self`.
        let err =
            unsafe { sys::bpf_xdp_attach(index, self.program, mode.flags(), core::ptr::null()) };
        if err != 0 {
            return Err(FilterError::Attach {
                ifindex,
                error: io::Error::from_raw_os_error(-err),
            });
        }
        self.attached.push((ifindex, mode));
        Ok(())
    }

    /// Sends what the filter steers on receive queue `queue` of port `ifindex` to the AF_XDP
    /// socket `fd`. `slot` numbers the port among xlb's ports (0..64); queues go up to 63.
    ///
    /// # Errors
    /// [`FilterError::Map`] when the kernel refuses the socket or the numbers are too large.
    pub fn bind_socket(
        &self,
        ifindex: u32,
        slot: u32,
        queue: u32,
        fd: RawFd,
    ) -> Result<(), FilterError> {
        let invalid = || FilterError::Map(io::Error::from(io::ErrorKind::InvalidInput));
        if slot >= 64 || queue >= XSK_QUEUES {
            return Err(invalid());
        }
        let value = u32::try_from(fd).map_err(|_| invalid())?;
        let base = slot * XSK_QUEUES;
        update(self.port_base, &ifindex, &base)?;
        update(self.xsks, &(base + queue), &value)
    }

    /// Makes the port `ifindex` a node's link: every unicast IP packet it receives is xlb's
    /// (the kernel routed it there for xlb), not only what `steer` names.
    ///
    /// # Errors
    /// [`FilterError::Map`] when the kernel refuses the update.
    pub fn mark_link(&self, ifindex: u32) -> Result<(), FilterError> {
        update(self.link_ports, &ifindex, &1u8)
    }

    /// Makes the `steer` map hold exactly `wanted`: adds what is missing, removes the rest.
    /// Returns (added, removed).
    ///
    /// # Errors
    /// [`FilterError::Map`] when an update fails (the map is full, say); the keys changed
    /// before the failure stay changed and are known, so the next sync carries on.
    pub fn sync(&mut self, wanted: &HashSet<SteerKey>) -> Result<(usize, usize), FilterError> {
        let stale: Vec<SteerKey> = self.steered.difference(wanted).copied().collect();
        let fresh: Vec<SteerKey> = wanted.difference(&self.steered).copied().collect();
        self.change(&fresh, &stale)?;
        Ok((fresh.len(), stale.len()))
    }

    /// Adds `add` to the `steer` map, then removes `remove`: a change in proportion to what
    /// changed, for a control plane that knows it.
    ///
    /// # Errors
    /// [`FilterError::Map`] when an update fails (the map is full, say); the keys changed
    /// before the failure stay changed.
    pub fn change(&mut self, add: &[SteerKey], remove: &[SteerKey]) -> Result<(), FilterError> {
        for key in add {
            update(self.steer, key, &1u8)?;
            self.steered.insert(*key);
        }
        for key in remove {
            // SAFETY: `steer` is our map's fd and `key` points at a whole `SteerKey`, the
            // map's key size.
            let err =
                unsafe { sys::bpf_map_delete_elem(self.steer, core::ptr::from_ref(key).cast()) };
            if err != 0 && -err != libc::ENOENT {
                return Err(FilterError::Map(io::Error::from_raw_os_error(-err)));
            }
            self.steered.remove(key);
        }
        Ok(())
    }

    /// Packets the filter redirected to xlb, passed to the kernel, and found to be xlb's but
    /// passed for want of a socket on their queue, over all CPUs.
    #[must_use]
    pub fn counts(&self) -> FilterCounts {
        FilterCounts {
            redirected: self.count(0),
            passed: self.count(1),
            unbound: self.count(2),
        }
    }

    /// What the filter decides for `frame`, run in the kernel on it (`BPF_PROG_TEST_RUN`),
    /// without a device or socket: whether the frame is xlb's or the kernel's. For tests and
    /// diagnostics; it moves the counters of [`Self::counts`].
    ///
    /// # Errors
    /// [`FilterError::Map`] when the kernel refuses the run (no privilege).
    pub fn classify(&self, frame: &[u8]) -> Result<FilterAction, FilterError> {
        self.classify_on(frame, None)
    }

    /// [`Self::classify`] as if `frame` arrived on the port `ingress` (an ifindex of this
    /// network namespace), for what depends on the port (a node's link).
    ///
    /// # Errors
    /// [`FilterError::Map`] when the kernel refuses the run (no privilege, no such port).
    pub fn classify_on(
        &self,
        frame: &[u8],
        ingress: Option<u32>,
    ) -> Result<FilterAction, FilterError> {
        let before = self.counts();
        self.test_run(frame, ingress, 1)?;
        let after = self.counts();
        Ok(
            if after.unbound > before.unbound || after.redirected > before.redirected {
                FilterAction::Steer
            } else {
                FilterAction::Pass
            },
        )
    }

    /// What the filter costs the kernel per packet: the mean time of `repeat` runs on `frame`
    /// (`BPF_PROG_TEST_RUN`, as [`Self::classify`]; the kernel times the runs itself, without
    /// the system call around them). For the stage budget of `make bench-budget`.
    ///
    /// # Errors
    /// [`FilterError::Map`] when the kernel refuses the run (no privilege).
    pub fn time(&self, frame: &[u8], repeat: u32) -> Result<core::time::Duration, FilterError> {
        let nanos = self.test_run(frame, None, repeat.max(1))?;
        Ok(core::time::Duration::from_nanos(u64::from(nanos)))
    }

    /// Runs the program `repeat` times on `frame` in the kernel; returns the mean duration of
    /// a run in nanoseconds.
    fn test_run(
        &self,
        frame: &[u8],
        ingress: Option<u32>,
        repeat: u32,
    ) -> Result<u32, FilterError> {
        let size = u32::try_from(frame.len())
            .map_err(|_| FilterError::Map(io::Error::from(io::ErrorKind::InvalidInput)))?;
        // `struct xdp_md` as the kernel reads it for a test run: no metadata, the whole frame.
        let md: [u32; 6] = [0, size, 0, ingress.unwrap_or(0), 0, 0];
        let mut opts = sys::bpf_test_run_opts {
            sz: core::mem::size_of::<sys::bpf_test_run_opts>(),
            data_in: frame.as_ptr().cast(),
            data_out: core::ptr::null_mut(),
            data_size_in: size,
            data_size_out: 0,
            ctx_in: if ingress.is_some() {
                md.as_ptr().cast()
            } else {
                core::ptr::null()
            },
            ctx_out: core::ptr::null_mut(),
            ctx_size_in: if ingress.is_some() {
                u32::try_from(core::mem::size_of_val(&md)).unwrap_or(0)
            } else {
                0
            },
            ctx_size_out: 0,
            retval: 0,
            repeat: i32::try_from(repeat).unwrap_or(i32::MAX),
            duration: 0,
            flags: 0,
            cpu: 0,
            batch_size: 0,
        };
        // SAFETY: `program` is our loaded program's fd; `opts` is a whole, sized options
        // struct whose input pointers and lengths describe `frame` and `md`, which outlive the
        // call and which the kernel only reads (no output buffer is given).
        let err = unsafe { sys::bpf_prog_test_run_opts(self.program, &mut opts) };
        if err != 0 {
            return Err(FilterError::Map(io::Error::from_raw_os_error(-err)));
        }
        Ok(opts.duration)
    }

    fn count(&self, slot: u32) -> u64 {
        // A per-CPU array's value is one u64 per possible CPU; 1024 covers any machine here.
        let mut values = vec![0u64; 1024];
        // SAFETY: `stats` is our per-CPU array map; `values` has room for every possible CPU's
        // 8-byte value, which is what the kernel writes.
        let err = unsafe {
            sys::bpf_map_lookup_elem(
                self.stats,
                core::ptr::from_ref(&slot).cast(),
                values.as_mut_ptr().cast(),
            )
        };
        if err != 0 {
            return 0;
        }
        values.iter().sum()
    }
}

impl Drop for XdpFilter {
    fn drop(&mut self) {
        for (ifindex, mode) in self.attached.drain(..) {
            if let Ok(index) = i32::try_from(ifindex) {
                // SAFETY: a plain syscall wrapper on our own attachment.
                let _ = unsafe { sys::bpf_xdp_detach(index, mode.flags(), core::ptr::null()) };
            }
        }
        // SAFETY: `object` came from bpf_object__open_mem and is closed exactly once, here;
        // every fd taken from it is dead after this.
        unsafe { sys::bpf_object__close(self.object.as_ptr()) };
    }
}

fn update<K, V>(map: RawFd, key: &K, value: &V) -> Result<(), FilterError> {
    // SAFETY: `key` and `value` point at whole values of the map's key and value types
    // (callers pass the types `bpf/filter.c` declares), which the kernel only reads.
    let err = unsafe {
        sys::bpf_map_update_elem(
            map,
            core::ptr::from_ref(key).cast(),
            core::ptr::from_ref(value).cast(),
            0,
        )
    };
    if err != 0 {
        return Err(FilterError::Map(io::Error::from_raw_os_error(-err)));
    }
    Ok(())
}

/// Lifts the locked-memory limit that older kernels charge BPF maps and UMEMs to. Failure is
/// not fatal: newer kernels account that memory to the cgroup instead.
pub fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit only reads the struct passed by reference.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}
