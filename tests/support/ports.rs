//! Ports for listeners, and waiting until something is true.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

/// Ports handed out by [`free_port`] lie below the kernel's ephemeral range
/// (32768-60999 by default), where every outgoing connection of every test
/// process takes its local port: a port from `bind(0)` is in that range
/// and, once released, is soon some client's source port, or another
/// process's listener.
const PORT_RANGE: std::ops::Range<u16> = 20000..32000;

/// A port no listener holds now, on 127.0.0.1 or on all addresses (the
/// gateway binds 0.0.0.0). Each test process starts at its own random place
/// in [`PORT_RANGE`] and never hands out a port twice, so concurrent tests
/// and test binaries rarely meet.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let span = u32::from(PORT_RANGE.end - PORT_RANGE.start);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(2_654_435_761) % span,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..span {
        let offset = NEXT.fetch_add(1, Ordering::SeqCst) % span;
        let port = PORT_RANGE.start + offset as u16;
        let free = |ip: [u8; 4]| TcpListener::bind(SocketAddr::from((ip, port))).is_ok();
        if free([127, 0, 0, 1]) && free([0, 0, 0, 0]) {
            return port;
        }
    }
    panic!("no free port in {PORT_RANGE:?}");
}

/// Calls `f` every 50 ms until it returns true or `timeout` elapses; returns
/// whether it succeeded so the caller can assert with a useful message.
#[must_use]
pub fn poll_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// True once something accepts TCP connections on 127.0.0.1:`port`.
pub fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}
