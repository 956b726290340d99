//! Temma data source names for ZeroMQ sockets.
//!
//! A DSN names a socket type, whether it binds or connects, and one or more endpoints:
//!
//! ```text
//! zmq://TYPE@ENDPOINT[;ENDPOINT…]        connect to every endpoint
//! zmq-bind://TYPE@ENDPOINT[;ENDPOINT…]   bind every endpoint
//! ```
//!
//! `TYPE` is one of `PUSH`, `PULL`, `PUB`, `SUB`, `REQ`, `REP` (upper case, as in Temma).
//! `ENDPOINT` is `host:port`, `*:port` (bind only: every interface), `[ipv6]:port`, or
//! `ipc:///absolute/path` (an extension over Temma, which only had TCP).
//!
//! [`Dsn`] parses itself ([`FromStr`], serde `try_from = "String"`) and prints itself back
//! ([`std::fmt::Display`]) in a form that parses to the same value.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

use serde::Deserialize;

/// Every valid form, quoted by each parse error so a user can fix the value at once.
pub const VALID_FORMS: &str = "valid forms: `zmq://TYPE@HOST:PORT` (connect) or \
`zmq-bind://TYPE@HOST:PORT` (bind), several endpoints separated by `;`; \
TYPE is one of PUSH, PULL, PUB, SUB, REQ, REP, ROUTER, DEALER; an endpoint is `127.0.0.1:5000`, \
`localhost:5000`, `*:5000` (bind only), `[::1]:5000` or `ipc:///absolute/path`";

/// Whether the socket binds its endpoints or connects to them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// `zmq://`: connect to each endpoint.
    Connect,
    /// `zmq-bind://`: bind each endpoint.
    Bind,
}

/// The ZeroMQ socket types a DSN may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SocketKind {
    Push,
    Pull,
    Pub,
    Sub,
    Req,
    Rep,
    /// The broker's snapshot socket (answers web nodes' history requests).
    Router,
    /// A web node's snapshot socket (asks the broker for its history).
    Dealer,
}

impl SocketKind {
    /// The upper-case name used in DSNs.
    pub fn as_str(self) -> &'static str {
        match self {
            SocketKind::Push => "PUSH",
            SocketKind::Pull => "PULL",
            SocketKind::Pub => "PUB",
            SocketKind::Sub => "SUB",
            SocketKind::Req => "REQ",
            SocketKind::Rep => "REP",
            SocketKind::Router => "ROUTER",
            SocketKind::Dealer => "DEALER",
        }
    }
}

impl fmt::Display for SocketKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The host part of a TCP endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// `*`: every interface (bind only); bound as `0.0.0.0`.
    Any,
    V4(Ipv4Addr),
    V6(Ipv6Addr),
    /// A host name such as `localhost`, resolved when the socket binds or connects.
    Name(String),
}

/// One endpoint of a DSN.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Tcp {
        host: Host,
        port: u16,
    },
    /// A Unix domain socket at an absolute path.
    Ipc(PathBuf),
}

impl Endpoint {
    /// The address in the form the zeromq crate takes (`tcp://…`, `ipc://…`).
    ///
    /// `*` becomes `0.0.0.0`: the crate does not accept `tcp://*:port`.
    pub fn zmq_address(&self) -> String {
        match self {
            Endpoint::Tcp {
                host: Host::Any,
                port,
            } => format!("tcp://0.0.0.0:{port}"),
            Endpoint::Tcp { host, port } => format!("tcp://{}", HostPort(host, *port)),
            Endpoint::Ipc(path) => format!("ipc://{}", path.display()),
        }
    }

    /// The TCP port, if this is a TCP endpoint.
    pub fn port(&self) -> Option<u16> {
        match self {
            Endpoint::Tcp { port, .. } => Some(*port),
            Endpoint::Ipc(_) => None,
        }
    }
}

struct HostPort<'a>(&'a Host, u16);

impl fmt::Display for HostPort<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let port = self.1;
        match self.0 {
            Host::Any => write!(f, "*:{port}"),
            Host::V4(ip) => write!(f, "{ip}:{port}"),
            Host::V6(ip) => write!(f, "[{ip}]:{port}"),
            Host::Name(name) => write!(f, "{name}:{port}"),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp { host, port } => HostPort(host, *port).fmt(f),
            Endpoint::Ipc(path) => write!(f, "ipc://{}", path.display()),
        }
    }
}

/// A parsed Temma ZeroMQ data source name.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Dsn {
    pub mode: Mode,
    pub kind: SocketKind,
    /// At least one endpoint; all of them are bound or connected on the same socket.
    pub endpoints: Vec<Endpoint>,
}

/// Why a DSN was rejected. Every message ends with [`VALID_FORMS`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DsnError {
    #[error("DSN `{0}` does not start with `zmq://` or `zmq-bind://`; {VALID_FORMS}")]
    Scheme(String),
    #[error("DSN `{0}` has no `TYPE@` before its endpoints; {VALID_FORMS}")]
    MissingType(String),
    #[error(
        "DSN `{dsn}` names socket type `{kind}`, which is not one of PUSH, PULL, PUB, SUB, REQ, REP, ROUTER, DEALER (upper case); {VALID_FORMS}"
    )]
    UnknownType { dsn: String, kind: String },
    #[error("DSN `{0}` has an empty endpoint; {VALID_FORMS}")]
    EmptyEndpoint(String),
    #[error("DSN `{dsn}`: endpoint `{endpoint}` {reason}; {VALID_FORMS}")]
    BadEndpoint {
        dsn: String,
        endpoint: String,
        reason: &'static str,
    },
}

impl FromStr for Dsn {
    type Err = DsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let dsn = s.trim();
        let (mode, rest) = if let Some(rest) = dsn.strip_prefix("zmq-bind://") {
            (Mode::Bind, rest)
        } else if let Some(rest) = dsn.strip_prefix("zmq://") {
            (Mode::Connect, rest)
        } else {
            return Err(DsnError::Scheme(dsn.to_owned()));
        };
        let Some((kind, endpoints)) = rest.split_once('@') else {
            return Err(DsnError::MissingType(dsn.to_owned()));
        };
        let kind = match kind {
            "PUSH" => SocketKind::Push,
            "PULL" => SocketKind::Pull,
            "PUB" => SocketKind::Pub,
            "SUB" => SocketKind::Sub,
            "REQ" => SocketKind::Req,
            "REP" => SocketKind::Rep,
            "ROUTER" => SocketKind::Router,
            "DEALER" => SocketKind::Dealer,
            "" => return Err(DsnError::MissingType(dsn.to_owned())),
            other => {
                return Err(DsnError::UnknownType {
                    dsn: dsn.to_owned(),
                    kind: other.to_owned(),
                });
            }
        };
        let endpoints = endpoints
            .split(';')
            .map(|endpoint| parse_endpoint(dsn, mode, endpoint.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Dsn {
            mode,
            kind,
            endpoints,
        })
    }
}

fn parse_endpoint(dsn: &str, mode: Mode, endpoint: &str) -> Result<Endpoint, DsnError> {
    let bad = |reason| DsnError::BadEndpoint {
        dsn: dsn.to_owned(),
        endpoint: endpoint.to_owned(),
        reason,
    };
    if endpoint.is_empty() {
        return Err(DsnError::EmptyEndpoint(dsn.to_owned()));
    }
    if let Some(path) = endpoint.strip_prefix("ipc://") {
        if !path.starts_with('/') || path.len() < 2 {
            return Err(bad(
                "needs an absolute path after `ipc://` (`ipc:///run/temma.sock`)",
            ));
        }
        return Ok(Endpoint::Ipc(PathBuf::from(path)));
    }
    if endpoint.contains("://") {
        return Err(bad(
            "has a transport prefix; write `host:port` for TCP, only `ipc://` is accepted",
        ));
    }
    let Some((host, port)) = endpoint.rsplit_once(':') else {
        return Err(bad("has no `:port`"));
    };
    let port: u16 = match port.parse::<u16>() {
        Ok(number) if port.bytes().all(|b| b.is_ascii_digit()) => number,
        _ => return Err(bad("has a port that is not a number from 0 to 65535")),
    };
    let host = if host == "*" {
        if mode == Mode::Connect {
            return Err(bad(
                "uses `*`, which only a bind (`zmq-bind://`) accepts; connect to a host name or address",
            ));
        }
        Host::Any
    } else if let Some(v6) = host.strip_prefix('[') {
        let Some(v6) = v6.strip_suffix(']') else {
            return Err(bad("has an IPv6 address without its closing `]`"));
        };
        Host::V6(
            v6.parse()
                .map_err(|_| bad("has an invalid IPv6 address between `[` and `]`"))?,
        )
    } else if host.contains(':') {
        return Err(bad("has an IPv6 address not enclosed in `[` and `]`"));
    } else if host.is_empty() {
        return Err(bad("has no host before `:port`"));
    } else if let Ok(v4) = host.parse::<Ipv4Addr>() {
        Host::V4(v4)
    } else if host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && !host.starts_with(['-', '.'])
    {
        if host.chars().all(|c| c.is_ascii_digit() || c == '.') {
            return Err(bad("has an invalid IPv4 address"));
        }
        Host::Name(host.to_owned())
    } else {
        return Err(bad(
            "has a host that is not an IPv4 address, `[IPv6]` address or host name",
        ));
    };
    Ok(Endpoint::Tcp { host, port })
}

impl TryFrom<String> for Dsn {
    type Error = DsnError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl fmt::Display for Dsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.mode {
            Mode::Connect => "zmq",
            Mode::Bind => "zmq-bind",
        };
        write!(f, "{scheme}://{}@", self.kind)?;
        for (i, endpoint) in self.endpoints.iter().enumerate() {
            if i > 0 {
                f.write_str(";")?;
            }
            endpoint.fmt(f)?;
        }
        Ok(())
    }
}

/// Reads an HTTP address to listen on (`server.listen`, `broker.http`): an IP address and port, `localhost:PORT` or `*:PORT`; an error
/// repeats the value and shows the forms.
pub fn listen_address<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<SocketAddr, D::Error> {
    let text = <String as Deserialize>::deserialize(deserializer)?;
    parse_listen(&text).map_err(serde::de::Error::custom)
}

/// See [`listen_address`].
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Ok(address);
    }
    let port = |rest: &str| rest.parse::<u16>().ok();
    if let Some(port) = text.strip_prefix("localhost:").and_then(port) {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    if let Some(port) = text.strip_prefix("*:").and_then(port) {
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    Err(format!(
        "`{text}` is not an address to listen on: write IP:PORT, such as `127.0.0.1:8000`, \
         `0.0.0.0:8000` or `[::1]:8000`, or `localhost:8000` or `*:8000`"
    ))
}

/// [`listen_address`] for an optional key: absent or `""` is `None`.
pub fn optional_listen_address<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<SocketAddr>, D::Error> {
    let text = <String as Deserialize>::deserialize(deserializer)?;
    if text.is_empty() {
        return Ok(None);
    }
    parse_listen(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: Host, port: u16) -> Endpoint {
        Endpoint::Tcp { host, port }
    }

    #[test]
    fn accepted_forms() {
        let table: Vec<(&str, Mode, SocketKind, Vec<Endpoint>)> = vec![
            (
                "zmq://PUSH@127.0.0.1:5000",
                Mode::Connect,
                SocketKind::Push,
                vec![tcp(Host::V4(Ipv4Addr::LOCALHOST), 5000)],
            ),
            (
                "zmq-bind://PULL@*:5000",
                Mode::Bind,
                SocketKind::Pull,
                vec![tcp(Host::Any, 5000)],
            ),
            (
                "zmq-bind://PUB@[::1]:6000",
                Mode::Bind,
                SocketKind::Pub,
                vec![tcp(Host::V6(Ipv6Addr::LOCALHOST), 6000)],
            ),
            (
                "zmq://SUB@localhost:6000",
                Mode::Connect,
                SocketKind::Sub,
                vec![tcp(Host::Name("localhost".into()), 6000)],
            ),
            (
                "zmq://SUB@ipc:///run/temma/pub.sock",
                Mode::Connect,
                SocketKind::Sub,
                vec![Endpoint::Ipc("/run/temma/pub.sock".into())],
            ),
            (
                "zmq://SUB@10.0.0.1:6000; 10.0.0.2:6000 ;ipc:///tmp/a",
                Mode::Connect,
                SocketKind::Sub,
                vec![
                    tcp(Host::V4(Ipv4Addr::new(10, 0, 0, 1)), 6000),
                    tcp(Host::V4(Ipv4Addr::new(10, 0, 0, 2)), 6000),
                    Endpoint::Ipc("/tmp/a".into()),
                ],
            ),
            (
                "zmq://REQ@broker.example.com:5000",
                Mode::Connect,
                SocketKind::Req,
                vec![tcp(Host::Name("broker.example.com".into()), 5000)],
            ),
            (
                "zmq-bind://REP@0.0.0.0:0",
                Mode::Bind,
                SocketKind::Rep,
                vec![tcp(Host::V4(Ipv4Addr::UNSPECIFIED), 0)],
            ),
        ];
        for (text, mode, kind, endpoints) in table {
            let dsn: Dsn = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(
                dsn,
                Dsn {
                    mode,
                    kind,
                    endpoints
                },
                "{text}"
            );
        }
    }

    #[test]
    fn rejected_forms() {
        let table: Vec<(&str, DsnError)> = vec![
            (
                "tcp://127.0.0.1:5000",
                DsnError::Scheme("tcp://127.0.0.1:5000".into()),
            ),
            (
                "zmqx://PUSH@127.0.0.1:5000",
                DsnError::Scheme("zmqx://PUSH@127.0.0.1:5000".into()),
            ),
            (
                "zmq://127.0.0.1:5000",
                DsnError::MissingType("zmq://127.0.0.1:5000".into()),
            ),
            (
                "zmq://@127.0.0.1:5000",
                DsnError::MissingType("zmq://@127.0.0.1:5000".into()),
            ),
            (
                "zmq://push@127.0.0.1:5000",
                DsnError::UnknownType {
                    dsn: "zmq://push@127.0.0.1:5000".into(),
                    kind: "push".into(),
                },
            ),
            (
                "zmq://STREAM@127.0.0.1:5000",
                DsnError::UnknownType {
                    dsn: "zmq://STREAM@127.0.0.1:5000".into(),
                    kind: "STREAM".into(),
                },
            ),
            ("zmq://PUSH@", DsnError::EmptyEndpoint("zmq://PUSH@".into())),
            (
                "zmq://PUSH@a:1;;b:2",
                DsnError::EmptyEndpoint("zmq://PUSH@a:1;;b:2".into()),
            ),
        ];
        for (text, error) in table {
            assert_eq!(text.parse::<Dsn>(), Err(error), "{text}");
        }
    }

    #[test]
    fn rejected_endpoints() {
        let table = [
            ("zmq://PUSH@127.0.0.1", "has no `:port`"),
            (
                "zmq://PUSH@127.0.0.1:99999",
                "has a port that is not a number from 0 to 65535",
            ),
            (
                "zmq://PUSH@127.0.0.1:+80",
                "has a port that is not a number from 0 to 65535",
            ),
            (
                "zmq://PUSH@127.0.0.1:",
                "has a port that is not a number from 0 to 65535",
            ),
            ("zmq://PUSH@:5000", "has no host before `:port`"),
            (
                "zmq://PUSH@*:5000",
                "uses `*`, which only a bind (`zmq-bind://`) accepts; connect to a host name or address",
            ),
            (
                "zmq-bind://PUB@::1:6000",
                "has an IPv6 address not enclosed in `[` and `]`",
            ),
            (
                "zmq-bind://PUB@[::1:6000",
                "has an IPv6 address without its closing `]`",
            ),
            (
                "zmq-bind://PUB@[zz::1]:6000",
                "has an invalid IPv6 address between `[` and `]`",
            ),
            ("zmq://PUSH@300.1.1.1:5000", "has an invalid IPv4 address"),
            (
                "zmq://PUSH@bad_host!:5000",
                "has a host that is not an IPv4 address, `[IPv6]` address or host name",
            ),
            (
                "zmq://PUSH@tcp://127.0.0.1:5000",
                "has a transport prefix; write `host:port` for TCP, only `ipc://` is accepted",
            ),
            (
                "zmq://PUSH@ipc://relative/path",
                "needs an absolute path after `ipc://` (`ipc:///run/temma.sock`)",
            ),
            (
                "zmq://PUSH@ipc://",
                "needs an absolute path after `ipc://` (`ipc:///run/temma.sock`)",
            ),
        ];
        for (text, reason) in table {
            match text.parse::<Dsn>() {
                Err(DsnError::BadEndpoint { reason: got, .. }) => assert_eq!(got, reason, "{text}"),
                other => panic!("{text}: expected a bad endpoint, got {other:?}"),
            }
        }
    }

    #[test]
    fn every_error_lists_the_valid_forms() {
        for text in ["", "zmq://x@1.2.3.4:1", "zmq://PUSH@*:1", "zmq://PUB@a:1;"] {
            let message = text.parse::<Dsn>().unwrap_err().to_string();
            assert!(message.ends_with(VALID_FORMS), "{message}");
            assert!(message.contains(&format!("`{text}`")), "{message}");
        }
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "zmq://PUSH@127.0.0.1:5000",
            "zmq-bind://PULL@*:5000",
            "zmq-bind://PUB@[::1]:6000;127.0.0.1:6001",
            "zmq://SUB@localhost:6000;ipc:///tmp/temma.sock",
            "zmq://REQ@a.example:1",
            "zmq-bind://REP@0.0.0.0:0",
        ] {
            let dsn: Dsn = text.parse().unwrap();
            assert_eq!(dsn.to_string(), text);
            assert_eq!(dsn.to_string().parse::<Dsn>().unwrap(), dsn);
        }
        // Whitespace around endpoints is trimmed, then printed canonically.
        let dsn: Dsn = " zmq://SUB@a:1 ; b:2 ".parse().unwrap();
        assert_eq!(dsn.to_string(), "zmq://SUB@a:1;b:2");
    }

    #[test]
    fn zmq_addresses() {
        let dsn: Dsn = "zmq-bind://PUB@*:6000;[::1]:6001;localhost:1;ipc:///tmp/x"
            .parse()
            .unwrap();
        let addresses: Vec<_> = dsn.endpoints.iter().map(Endpoint::zmq_address).collect();
        assert_eq!(
            addresses,
            [
                "tcp://0.0.0.0:6000",
                "tcp://[::1]:6001",
                "tcp://localhost:1",
                "ipc:///tmp/x"
            ]
        );
    }

    #[test]
    fn deserializes_through_serde() {
        #[derive(Deserialize)]
        struct Holder {
            dsn: Dsn,
        }
        let holder: Holder = serde_json::from_str(r#"{"dsn":"zmq://SUB@127.0.0.1:6000"}"#).unwrap();
        assert_eq!(holder.dsn.kind, SocketKind::Sub);
        let error = serde_json::from_str::<Holder>(r#"{"dsn":"zmq://SUB@*:6000"}"#)
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("only a bind"), "{error}");
    }

    proptest::proptest! {
        /// Any text either parses to a DSN that prints back to itself, or is refused with the
        /// list of valid forms; nothing panics.
        #[test]
        fn any_text_round_trips_or_is_refused(
            text in "(zmq|zmq-bind|tcp|)(://)?(PUSH|PULL|PUB|SUB|REQ|REP|push|X)?@?([a-z0-9.*:\\[\\]/ ;-]{0,30})"
        ) {
            match text.parse::<Dsn>() {
                Ok(dsn) => {
                    let printed = dsn.to_string();
                    proptest::prop_assert_eq!(printed.parse::<Dsn>(), Ok(dsn));
                }
                Err(error) => proptest::prop_assert!(error.to_string().ends_with(VALID_FORMS)),
            }
        }
    }
}
