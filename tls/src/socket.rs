//! The TCP socket under a TLS session, read through a buffer.
//!
//! rustls reads at most 4 KiB from its transport at a time, so the record
//! carrying a 4 KiB payload (4 KiB plus header and tag) would take two read
//! syscalls, and a burst of queued records one or two each. Through this
//! buffer one syscall takes whatever the socket holds, up to
//! [`READ_BUFFER`], and rustls's reads are served from memory. Writes go
//! straight to the socket.

use tokio::io::BufReader;
use tokio::net::TcpStream;

/// What one read syscall may take: four full-size TLS records.
pub const READ_BUFFER: usize = 64 << 10;

/// A TCP connection as TLS sessions use it.
pub type Socket = BufReader<TcpStream>;

/// `tcp`, with Nagle off (requests and replies are sent whole, and must
/// leave at once) and reads buffered.
pub fn socket(tcp: TcpStream) -> Socket {
    let _ = tcp.set_nodelay(true);
    BufReader::with_capacity(READ_BUFFER, tcp)
}
