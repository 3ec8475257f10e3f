//! The fixture-table runner shared by the packet fixture tests.
//!
//! Each row names a case, builds an input frame, lists the rewrites to apply and the expected
//! result: a drop reason, a pass reason, or a class and an output frame built from scratch by
//! the builder (so every checksum in it is a full recomputation). A failing row prints a
//! per-layer decoded diff; `XLB_FIXTURE_PCAP_DIR=/tmp/x` also dumps its frames as pcap, and
//! `XLB_FIXTURE_CORPUS_DIR` collects the inputs as fuzzing seeds.

use std::net::IpAddr;

use super::{dump_pcap, layer_diff};
use xlb_dataplane::packet::builder::PacketBuilder;
use xlb_dataplane::packet::{
    parse, set_destination, set_ethernet, set_source, Class, DropReason, Endpoint, IcmpErrorKind,
    MacAddr, PassReason,
};

/// One rewrite step.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Op {
    Dst(IpAddr, u16),
    Src(IpAddr, u16),
    Eth(MacAddr, MacAddr),
}

/// What a row expects.
pub(crate) enum Expect {
    Drop(DropReason),
    Pass(PassReason),
    /// The class after parsing, and the frame after the rewrites.
    Output(ClassIs, Vec<u8>),
}

/// The class, without the offsets (those are checked through the output frame).
#[derive(Debug, PartialEq)]
pub(crate) enum ClassIs {
    Ordinary,
    FirstFragment,
    NonFirstFragment,
    IcmpError(IcmpErrorKind),
}

pub(crate) struct Case {
    pub(crate) name: &'static str,
    pub(crate) input: Vec<u8>,
    pub(crate) ops: Vec<Op>,
    pub(crate) expect: Expect,
}

pub(crate) fn case(name: &'static str, input: &PacketBuilder) -> Case {
    Case {
        name,
        input: input.build(),
        ops: Vec::new(),
        expect: Expect::Drop(DropReason::EthernetTruncated),
    }
}

impl Case {
    pub(crate) fn raw(name: &'static str, input: Vec<u8>) -> Self {
        Self {
            name,
            input,
            ops: Vec::new(),
            expect: Expect::Drop(DropReason::EthernetTruncated),
        }
    }
    pub(crate) fn dst(mut self, addr: impl Into<IpAddr>, port: u16) -> Self {
        self.ops.push(Op::Dst(addr.into(), port));
        self
    }
    pub(crate) fn src(mut self, addr: impl Into<IpAddr>, port: u16) -> Self {
        self.ops.push(Op::Src(addr.into(), port));
        self
    }
    pub(crate) fn eth(mut self, src: MacAddr, dst: MacAddr) -> Self {
        self.ops.push(Op::Eth(src, dst));
        self
    }
    pub(crate) fn drops(mut self, reason: DropReason) -> Self {
        self.expect = Expect::Drop(reason);
        self
    }
    pub(crate) fn passes(mut self, reason: PassReason) -> Self {
        self.expect = Expect::Pass(reason);
        self
    }
    pub(crate) fn gives(mut self, class: ClassIs, output: &PacketBuilder) -> Self {
        self.expect = Expect::Output(class, output.build());
        self
    }

    /// Runs the row; returns a failure description.
    pub(crate) fn run(&self) -> Result<(), String> {
        let parsed = parse(&self.input);
        match (&self.expect, parsed) {
            (Expect::Drop(want), Err(got)) if *want == got => Ok(()),
            (Expect::Drop(want), other) => Err(format!("expected drop {want:?}, got {other:?}")),
            (Expect::Pass(want), Ok(p)) if p.class == Class::NotForUs(*want) => Ok(()),
            (Expect::Pass(want), other) => Err(format!("expected pass {want:?}, got {other:?}")),
            (Expect::Output(_, _), Err(reason)) => Err(format!("dropped as {reason:?}")),
            (Expect::Output(class, want), Ok(mut p)) => {
                check_class(&p, class)?;
                let mut frame = self.input.clone();
                for op in &self.ops {
                    let result = match *op {
                        Op::Dst(a, port) => {
                            set_destination(&mut frame, &mut p, &Endpoint::new(a, port))
                        }
                        Op::Src(a, port) => set_source(&mut frame, &mut p, &Endpoint::new(a, port)),
                        Op::Eth(s, d) => set_ethernet(&mut frame, s, d),
                    };
                    result.map_err(|e| format!("{op:?} refused: {e:?}"))?;
                }
                if frame != *want {
                    dump_pcap(self.name, &[&self.input, &frame, want]);
                    return Err(format!(
                        "output differs (- expected, + actual):\n{}",
                        layer_diff(want, &frame)
                    ));
                }
                // The Parsed value kept up with the rewrites: it describes the output frame.
                let reparsed = parse(&frame).map_err(|r| format!("output dropped: {r:?}"))?;
                if reparsed.key != p.key {
                    return Err(format!(
                        "key after rewrite {:?}, output parses as {:?}",
                        p.key, reparsed.key
                    ));
                }
                Ok(())
            }
        }
    }
}

/// Whether `p` has the class a row expects.
fn check_class(p: &xlb_dataplane::packet::Parsed, class: &ClassIs) -> Result<(), String> {
    let got_class = match p.class {
        Class::Ordinary => ClassIs::Ordinary,
        Class::Fragment(f) if f.first => ClassIs::FirstFragment,
        Class::Fragment(_) => ClassIs::NonFirstFragment,
        Class::IcmpError(e) => ClassIs::IcmpError(e.kind),
        Class::NotForUs(r) => return Err(format!("passed as {r:?}")),
    };
    if got_class != *class {
        return Err(format!("class {got_class:?}, expected {class:?}"));
    }
    Ok(())
}

pub(crate) fn run_table(cases: &[Case]) {
    // `XLB_FIXTURE_CORPUS_DIR` collects every input as a seed for the fuzz target, with 18
    // bytes appended for its rewrite choice.
    if let Some(dir) = std::env::var_os("XLB_FIXTURE_CORPUS_DIR") {
        std::fs::create_dir_all(&dir).unwrap();
        for c in cases {
            let mut seed = c.input.clone();
            seed.extend_from_slice(&[
                198, 18, 128, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x1f, 0x90,
            ]);
            let name: String = c
                .name
                .chars()
                .map(|ch| if ch.is_ascii_alphanumeric() { ch } else { '_' })
                .collect();
            std::fs::write(std::path::Path::new(&dir).join(name), seed).unwrap();
        }
    }
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|c| c.run().err().map(|e| format!("case '{}': {e}", c.name)))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
