//! What temma believes about who sent a request: whether a browser sent it from another site
//! (cross-site request forgery), and which client it comes from (for rate limits).
//!
//! **Cross-site.** A `POST` from a browser on another site is refused (`403`) unless its origin
//! is in `server.cors_origins`, the rule Go's `net/http` `CrossOriginProtection` applies:
//! - `Sec-Fetch-Site: same-origin` or `none` (sent by every current browser): allowed;
//!   `same-site` or `cross-site`: allowed only for a listed `Origin`.
//! - Without `Sec-Fetch-Site` (older browsers): an `Origin` whose host and port are the
//!   request's `Host` is the same site, allowed; a listed one is allowed; any other (and
//!   `null`) is refused.
//! - Neither header: not a browser (curl, a load tool, a server): allowed. Browsers send
//!   `Origin` with every cross-site `POST`.
//!
//! **Client.** The client is the peer's IP address, or, when the peer is one of
//! `server.trusted_proxies`, the right-most address of `X-Forwarded-For` that is not a trusted
//! proxy. An IPv6 client is its /64 network: one host can hold a whole /64.

use std::net::IpAddr;

use serde::Deserialize;

/// Why a cross-site request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrossSite(pub String);

/// Applies the cross-site rule to a request's headers.
pub fn check_origin(
    sec_fetch_site: Option<&str>,
    origin: Option<&str>,
    host: Option<&str>,
    allowed: &[String],
) -> Result<(), CrossSite> {
    let any = allowed.iter().any(|o| o == "*");
    let listed = |origin: &str| any || allowed.iter().any(|o| o.eq_ignore_ascii_case(origin));
    let refuse = |origin: Option<&str>| {
        CrossSite(format!(
            "cross-site request refused: origin `{}` may not post here (the server lists the \
             sites that may in `server.cors_origins`)",
            origin.unwrap_or("(none)")
        ))
    };
    match sec_fetch_site.map(str::to_ascii_lowercase).as_deref() {
        Some("same-origin") | Some("none") => return Ok(()),
        Some(_) => {
            return if origin.is_some_and(listed) {
                Ok(())
            } else {
                Err(refuse(origin))
            };
        }
        None => {}
    }
    let Some(origin) = origin else {
        return Ok(());
    };
    if listed(origin) {
        return Ok(());
    }
    let origin_host = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    match (origin_host, host) {
        (Some(origin_host), Some(host)) if origin_host.eq_ignore_ascii_case(host) => Ok(()),
        _ => Err(refuse(Some(origin))),
    }
}

/// One `server.trusted_proxies` entry: an address (`127.0.0.1`, `::1`) or a network
/// (`10.0.0.0/8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct TrustedProxy(ipnet::IpNet);

impl TryFrom<String> for TrustedProxy {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        if let Ok(network) = text.parse::<ipnet::IpNet>() {
            return Ok(TrustedProxy(network));
        }
        match text.parse::<IpAddr>() {
            Ok(address) => Ok(TrustedProxy(ipnet::IpNet::from(address))),
            Err(_) => Err(format!(
                "`{text}` is not an IP address or network: write `127.0.0.1`, `::1` or \
                 `10.0.0.0/8`"
            )),
        }
    }
}

impl TrustedProxy {
    pub fn contains(&self, address: &IpAddr) -> bool {
        self.0.contains(address)
    }
}

/// The client a request comes from, as scripts see it in `msg.client`: `ip:<address>`, or
/// `ip:<network>/64` for IPv6.
pub fn client(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[TrustedProxy]) -> String {
    let trusted_peer = |address: &IpAddr| trusted.iter().any(|proxy| proxy.contains(address));
    let mut address = canonical(peer);
    if trusted_peer(&address)
        && let Some(list) = forwarded_for
    {
        for hop in list.rsplit(',') {
            let Ok(hop) = hop.trim().parse::<IpAddr>() else {
                break;
            };
            address = canonical(hop);
            if !trusted_peer(&address) {
                break;
            }
        }
    }
    match address {
        IpAddr::V4(v4) => {
            // Without `fmt` (`Ipv4Addr`'s `Display` cost a few % of a light load's POST).
            let mut out = String::with_capacity(18);
            out.push_str("ip:");
            let mut number = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                out.push_str(number.format(octet));
            }
            out
        }
        IpAddr::V6(v6) => {
            let network = ipnet::Ipv6Net::new(v6, 64)
                .expect("64 is a valid prefix")
                .trunc();
            format!("ip:{network}")
        }
    }
}

/// A request head as the handlers read it, whether salvo parsed it or the direct path
/// (`direct`) did.
pub trait Head {
    /// The first value of a header (`name` in lower case), if it is visible ASCII.
    fn header(&self, name: &str) -> Option<&str>;
    /// Whether the header is there at all, whatever its value.
    fn has_header(&self, name: &str) -> bool;
    /// The query string, without `?`.
    fn query(&self) -> Option<&str>;
    /// The TCP peer.
    fn peer(&self) -> Option<std::net::SocketAddr>;
}

impl Head for salvo::Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers().get(name).and_then(|v| v.to_str().ok())
    }

    fn has_header(&self, name: &str) -> bool {
        self.headers().contains_key(name)
    }

    fn query(&self) -> Option<&str> {
        self.uri().query()
    }

    fn peer(&self) -> Option<std::net::SocketAddr> {
        peer_of(self)
    }
}

/// A request target split at its `?`: the path, and the query string if any.
pub fn path_and_query(target: &str) -> (&str, Option<&str>) {
    match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    }
}

/// A header value as `http::HeaderValue::to_str` gives it: only visible ASCII (and tabs).
pub fn visible_ascii(value: &[u8]) -> Option<&str> {
    value
        .iter()
        .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b))
        .then(|| std::str::from_utf8(value).ok())
        .flatten()
}

/// The TCP peer of a request salvo serves.
pub fn peer_of(req: &salvo::Request) -> Option<std::net::SocketAddr> {
    let address = req.remote_addr();
    address
        .as_ipv4()
        .map(|a| std::net::SocketAddr::V4(*a))
        .or_else(|| address.as_ipv6().map(|a| std::net::SocketAddr::V6(*a)))
}

/// [`client`] of a request: its TCP peer and its `X-Forwarded-For`.
pub fn client_of(req: &(impl Head + ?Sized), trusted: &[TrustedProxy]) -> String {
    let peer = req
        .peer()
        .map(|peer| peer.ip())
        .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    client(peer, req.header("x-forwarded-for"), trusted)
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The `Access-Control-Allow-Origin` value for a request from `origin`, if CORS allows it.
pub fn allowed_origin(origins: &[String], origin: &str) -> Option<String> {
    if origins.iter().any(|o| o == "*") {
        Some("*".to_owned())
    } else if origins.iter().any(|o| o == origin) {
        Some(origin.to_owned())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_site_rule() {
        let none: &[String] = &[];
        let listed = vec!["https://chat.example".to_owned()];
        let host = Some("chat.local:8000");
        // Browsers with Sec-Fetch-Site.
        assert!(check_origin(Some("same-origin"), Some("http://x"), host, none).is_ok());
        assert!(check_origin(Some("none"), None, host, none).is_ok());
        assert!(check_origin(Some("cross-site"), Some("http://evil.example"), host, none).is_err());
        assert!(check_origin(Some("same-site"), Some("http://a.chat.local"), host, none).is_err());
        assert!(
            check_origin(
                Some("cross-site"),
                Some("https://chat.example"),
                host,
                &listed
            )
            .is_ok()
        );
        // Older browsers: Origin against Host.
        assert!(check_origin(None, Some("http://chat.local:8000"), host, none).is_ok());
        assert!(check_origin(None, Some("https://CHAT.local:8000"), host, none).is_ok());
        assert!(check_origin(None, Some("http://chat.local:9000"), host, none).is_err());
        assert!(check_origin(None, Some("null"), host, none).is_err());
        let error = check_origin(None, Some("http://evil.example"), host, none).unwrap_err();
        assert!(error.0.contains("`http://evil.example`"), "{}", error.0);
        // Not a browser.
        assert!(check_origin(None, None, host, none).is_ok());
        // Any origin.
        assert!(
            check_origin(
                Some("cross-site"),
                Some("http://x"),
                host,
                &["*".to_owned()]
            )
            .is_ok()
        );
    }

    #[test]
    fn client_addresses() {
        let trusted: Vec<TrustedProxy> = ["127.0.0.1", "10.0.0.0/8"]
            .iter()
            .map(|t| TrustedProxy::try_from((*t).to_owned()).unwrap())
            .collect();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(client(ip("192.0.2.7"), None, &trusted), "ip:192.0.2.7");
        // An untrusted peer's X-Forwarded-For is ignored.
        assert_eq!(
            client(ip("192.0.2.7"), Some("198.51.100.1"), &trusted),
            "ip:192.0.2.7"
        );
        // A trusted proxy: the right-most address that is not a proxy.
        assert_eq!(
            client(
                ip("127.0.0.1"),
                Some("203.0.113.9, 198.51.100.1, 10.1.2.3"),
                &trusted
            ),
            "ip:198.51.100.1"
        );
        // Garbage stops the walk at the last good address.
        assert_eq!(
            client(ip("127.0.0.1"), Some("nonsense, 10.1.2.3"), &trusted),
            "ip:10.1.2.3"
        );
        assert_eq!(
            client(ip("2001:db8:1:2:3:4:5:6"), None, &[]),
            "ip:2001:db8:1:2::/64"
        );
        assert_eq!(client(ip("::ffff:192.0.2.1"), None, &[]), "ip:192.0.2.1");
        assert!(TrustedProxy::try_from("10.0.0.0/33".to_owned()).is_err());
        assert!(TrustedProxy::try_from("localhost".to_owned()).is_err());
    }
}
