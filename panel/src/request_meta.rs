//! Who is asking, as far as the network tells: the client address and user agent.
//!
//! `X-Forwarded-For` is believed only when the TCP peer is a configured proxy, and then only
//! up to the first hop that is not one, so a client cannot choose the address its rate
//! limits and audit entries are charged to.

use std::net::IpAddr;

use actix_web::HttpRequest;
use actix_web::http::header::USER_AGENT;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestMeta {
    pub ip: Option<IpAddr>,
    pub user_agent: Option<String>,
}

impl RequestMeta {
    pub fn from_request(req: &HttpRequest, trusted_proxies: &[IpAddr]) -> RequestMeta {
        let peer = req.peer_addr().map(|a| a.ip());
        let forwarded = req
            .headers()
            .get_all("x-forwarded-for")
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(",");
        RequestMeta {
            ip: client_ip(peer, &forwarded, trusted_proxies),
            user_agent: req
                .headers()
                .get(USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .map(|s| s.chars().take(512).collect()),
        }
    }

    /// Nobody: commands run from the CLI.
    pub fn system() -> RequestMeta {
        RequestMeta {
            ip: None,
            user_agent: None,
        }
    }
}

/// Walks the forwarding chain from the nearest hop outwards, past trusted proxies only.
pub fn client_ip(peer: Option<IpAddr>, forwarded_for: &str, trusted: &[IpAddr]) -> Option<IpAddr> {
    let mut client = peer?;
    if !trusted.contains(&client) {
        return Some(client);
    }
    for hop in forwarded_for.rsplit(',').map(str::trim).filter(|h| !h.is_empty()) {
        let Ok(ip) = hop.parse::<IpAddr>() else {
            // A garbled hop ends the chain of trust: keep the last address we could verify.
            break;
        };
        client = ip;
        if !trusted.contains(&ip) {
            break;
        }
    }
    Some(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarded_headers_from_strangers_are_ignored() {
        assert_eq!(
            client_ip(Some(ip("203.0.113.9")), "1.2.3.4", &[]),
            Some(ip("203.0.113.9"))
        );
        assert_eq!(
            client_ip(Some(ip("203.0.113.9")), "1.2.3.4", &[ip("10.0.0.1")]),
            Some(ip("203.0.113.9"))
        );
    }

    #[test]
    fn a_trusted_proxy_names_the_client_but_cannot_be_chained_past() {
        let proxy = ip("10.0.0.1");
        // The client forged "6.6.6.6"; the proxy appended the real address.
        assert_eq!(
            client_ip(Some(proxy), "6.6.6.6, 198.51.100.7", &[proxy]),
            Some(ip("198.51.100.7"))
        );
        // Two trusted proxies in a row are both skipped.
        let inner = ip("10.0.0.2");
        assert_eq!(
            client_ip(Some(proxy), "198.51.100.7, 10.0.0.2", &[proxy, inner]),
            Some(ip("198.51.100.7"))
        );
        assert_eq!(client_ip(Some(proxy), "garbage", &[proxy]), Some(proxy));
    }
}
