//! What the kernel tests of this crate share.

use std::process::Command;

/// Why a test that needs root and network namespaces cannot run here, if it cannot.
pub(crate) fn skip_reason() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("not root: AF_XDP, XDP and network namespaces need root".into());
    }
    let probe = format!("xlbprobe{}", std::process::id());
    let added = Command::new("ip").args(["netns", "add", &probe]).status();
    let _ = Command::new("ip").args(["netns", "del", &probe]).status();
    match added {
        Ok(s) if s.success() => None,
        _ => Some("this kernel or sandbox cannot create network namespaces".into()),
    }
}
