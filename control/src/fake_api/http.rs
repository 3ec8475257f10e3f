//! The fake API server's HTTP/1.1 framing: request heads, JSON and chunked responses, Status
//! errors, query decoding. Just what the Kubernetes client sends and reads.

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Keeps a watch connection open and silent until the client closes it.
pub(super) async fn hang(mut stream: TcpStream) {
    let mut buf = [0u8; 512];
    while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
}

/// A Status object's JSON, as the API server answers errors with.
pub(super) fn status(code: u16, reason: &str, message: &str) -> String {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
    .to_string()
}

/// Writes one chunk of a chunked response: `line` and a newline.
pub(super) async fn chunk(stream: &mut TcpStream, line: &str) -> std::io::Result<()> {
    let data = format!("{:x}\r\n{line}\n\r\n", line.len() + 1);
    stream.write_all(data.as_bytes()).await
}

/// Responds with `code` and the JSON `body`.
pub(super) async fn respond(stream: &mut TcpStream, code: u16, body: &str) -> std::io::Result<()> {
    respond_with(stream, code, "", body).await
}

/// Responds with `code`, the extra header lines `headers` (each ending in CRLF) and `body`.
pub(super) async fn respond_with(
    stream: &mut TcpStream,
    code: u16,
    headers: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        410 => "Gone",
        429 => "Too Many Requests",
        504 => "Gateway Timeout",
        _ => "Error",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await
}

/// Reads one request head (requests here have no body); `buf` keeps what follows it.
pub(super) async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            return Some(head);
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Decodes `%XX` escapes and `+` of a query value.
pub(super) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
