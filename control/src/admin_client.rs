//! The client side of the admin API, for `xlb status`, `xlb metrics` and `xlb flows`: one GET,
//! the body back.
//! HTTP/1.0, so that a streamed answer ends with the connection instead of in chunks.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::error::Error;

/// GETs `path` from the admin API at `admin` and returns the body.
///
/// # Errors
/// A message when xlb is not running there or answers with an error status.
pub fn get(admin: SocketAddr, path: &str) -> Result<String, Error> {
    let unreachable = |reason| Error::AdminUnreachable { admin, reason };
    let mut stream =
        TcpStream::connect_timeout(&admin, Duration::from_secs(2)).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(unreachable)?;
    write!(stream, "GET {path} HTTP/1.0\r\nhost: {admin}\r\n\r\n").map_err(unreachable)?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(unreachable)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| Error::AdminAnswer("a malformed answer".into()))?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        return Err(Error::AdminAnswer(status.to_owned()));
    }
    Ok(body.to_owned())
}
