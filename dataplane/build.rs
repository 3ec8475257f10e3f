//! Compiles the XDP filter (`bpf/filter.c`) with clang into an eBPF object that the `xsk`
//! module embeds and loads from memory. `make deps` installs clang; without it the build
//! fails here with that advice.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = out.join("filter.o");
    println!("cargo:rerun-if-changed=bpf/filter.c");
    let arch_include = format!(
        "/usr/include/{}-linux-gnu",
        std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into())
    );
    let status = Command::new("clang")
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg("-I")
        .arg(&arch_include)
        .args(["-c", "bpf/filter.c", "-o"])
        .arg(&object)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("clang failed to compile bpf/filter.c ({s})"),
        Err(e) => panic!("cannot run clang to build the XDP filter ({e}); run `make deps`"),
    }
}
