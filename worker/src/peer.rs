//! Who may connect to the worker's socket: only its router. `main` reads the credentials of
//! each accepted connection (`SO_PEERCRED`: the connecting process's pid and effective uid at
//! `connect` time) and [`check_peer`] decides; a refused connection is closed and logged, and
//! the worker goes back to accepting, so a stranger that connects first does not take the
//! router's place.
//!
//! The socket is already in a 0700 directory with mode 0600, which keeps other users out;
//! this also keeps out other processes of the same user (and root), which could otherwise
//! drive the worker, or occupy its one connection so that the router cannot.

/// The connecting process, as `SO_PEERCRED` gives it (`None` where the kernel gave none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub pid: Option<i32>,
    pub uid: Option<u32>,
}

/// Who the router is: the worker's parent (`getppid`; the router starts its workers itself,
/// and checks at start-up that it still is, see `cli::check_parent`), running as the worker's
/// own effective uid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Router {
    pub pid: i32,
    pub uid: u32,
}

/// Why a connection was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the peer's credentials cannot be read: {0}")]
    NoCredentials(String),
    #[error(
        "peer pid {} uid {} is not the router (pid {router_pid}, uid {router_uid})",
        known(.pid),
        known(.uid)
    )]
    NotTheRouter {
        pid: Option<i32>,
        uid: Option<u32>,
        router_pid: i32,
        router_uid: u32,
    },
}

fn known<T: std::fmt::Display>(value: &Option<T>) -> String {
    value
        .as_ref()
        .map_or_else(|| "unknown".into(), ToString::to_string)
}

/// Accepts `peer` only if it is `router`: same pid and same uid, both known.
pub fn check_peer(peer: Result<Peer, String>, router: Router) -> Result<(), Refused> {
    let peer = peer.map_err(Refused::NoCredentials)?;
    if peer.pid == Some(router.pid) && peer.uid == Some(router.uid) {
        Ok(())
    } else {
        Err(Refused::NotTheRouter {
            pid: peer.pid,
            uid: peer.uid,
            router_pid: router.pid,
            router_uid: router.uid,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTER: Router = Router {
        pid: 4242,
        uid: 1000,
    };

    fn peer(pid: Option<i32>, uid: Option<u32>) -> Result<Peer, String> {
        Ok(Peer { pid, uid })
    }

    #[test]
    fn only_the_router_is_accepted() {
        assert_eq!(check_peer(peer(Some(4242), Some(1000)), ROUTER), Ok(()));
        for (pid, uid) in [
            (Some(4243), Some(1000)), // another process of the same user
            (Some(4242), Some(0)),    // root, or the pid reused by another user
            (Some(4242), Some(1001)),
            (None, Some(1000)), // nothing the kernel could tell
            (Some(4242), None),
            (Some(1), Some(1000)),
        ] {
            assert_eq!(
                check_peer(peer(pid, uid), ROUTER),
                Err(Refused::NotTheRouter {
                    pid,
                    uid,
                    router_pid: 4242,
                    router_uid: 1000
                })
            );
        }
    }

    #[test]
    fn unreadable_credentials_are_refused_and_named() {
        let err = check_peer(Err("connection reset".into()), ROUTER).unwrap_err();
        assert_eq!(err, Refused::NoCredentials("connection reset".into()));
        let text = check_peer(peer(Some(7), Some(0)), ROUTER)
            .unwrap_err()
            .to_string();
        assert_eq!(
            text,
            "peer pid 7 uid 0 is not the router (pid 4242, uid 1000)"
        );
        let text = check_peer(peer(None, Some(0)), ROUTER)
            .unwrap_err()
            .to_string();
        assert!(text.starts_with("peer pid unknown uid 0 "), "{text}");
    }
}
