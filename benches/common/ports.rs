//! Free loopback ports for the benches' broker configurations (included with `#[path]`).

/// A port of 127.0.0.1 nothing listens on. The kernel may hand the port it just freed out
/// again: a pair's configurations (a dozen ports) then named one port twice, and a broker
/// failed to bind. A port is given once per run.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}
