//! Byte streams that are not HTTP, for TCPMappings.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use super::client::connect;

/// A TCP upstream on 127.0.0.1 that speaks no HTTP: each connection is
/// read until the client ends its writing (half-close), then answered with
/// `<name>:<what was read>` and closed. So a reply proves that the end of
/// the client's stream crossed the gateway while the way back stayed open.
pub struct ByteEcho {
    addr: SocketAddr,
    name: String,
    stop: Arc<AtomicBool>,
}

impl ByteEcho {
    pub fn start(name: &str) -> ByteEcho {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local_addr");
        let stop = Arc::new(AtomicBool::new(false));
        let (tag, stopping) = (name.to_string(), Arc::clone(&stop));
        thread::spawn(move || {
            for conn in listener.incoming() {
                if stopping.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(mut conn) = conn else { continue };
                let tag = tag.clone();
                thread::spawn(move || {
                    let mut read = Vec::new();
                    if conn.read_to_end(&mut read).is_ok() {
                        let mut reply = format!("{tag}:").into_bytes();
                        reply.extend_from_slice(&read);
                        let _ = conn.write_all(&reply);
                    }
                });
            }
        });
        ByteEcho {
            addr,
            name: name.to_string(),
            stop,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for ByteEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

/// Sends `bytes` to 127.0.0.1:`port`, ends the writing side (half-close)
/// and returns everything read until the other side closes.
pub fn half_close_exchange(port: u16, bytes: &[u8]) -> io::Result<Vec<u8>> {
    let mut s = connect(port)?;
    s.write_all(bytes)?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}
