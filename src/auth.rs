//! Who is calling: authentication of tfsd.v1 callers and the principal each request runs as.
//!
//! A caller proves who it is with a bearer token (`authorization: Bearer TOKEN` metadata)
//! or, on a TLS listener with `tls.client_ca`, with a client certificate. The config maps
//! each credential to a principal and a role: clients see and act on their own sessions
//! only; operators on all. tfsd keeps only SHA-256 digests of tokens and certificates, so
//! the config holds nothing that can be replayed.
//!
//! With no credential configured, authentication is off and every caller is the anonymous
//! operator — acceptable only on loopback, which `Config` enforces unless the operator says
//! otherwise explicitly.
//!
//! A token file other users could read is refused at start-up (`token_file_is_private`): a
//! token anyone can read proves nothing about who sends it.
//!
//! On the Unix socket (`server.unix_socket`, never on TCP) the kernel also says which uid
//! connected (SO_PEERCRED, read once per connection when it is accepted): `[[auth.peers]]`
//! maps a uid to a principal and a role, as containerd and Docker trust their socket's peers.
//! There a bearer token, when sent, decides (a wrong one is refused, never ignored in favour
//! of the uid); without one, a mapped uid is its principal, and any other uid is refused
//! (UNAUTHENTICATED) whenever credentials are configured (`authenticate_unix_peer`).

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tonic::{Request, Status};

/// What a principal may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sees and acts on its own sessions only.
    Client,
    /// Sees and acts on every session.
    Operator,
}

/// The identity a request runs as, put into the request's extensions by `authenticate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The principal's name; empty for the anonymous caller (authentication off).
    pub principal: String,
    pub role: Role,
}

impl Caller {
    /// The caller when authentication is off.
    pub fn anonymous() -> Caller {
        Caller {
            principal: String::new(),
            role: Role::Operator,
        }
    }

    /// Whether this caller may see and act on a session owned by `owner`.
    pub fn may_access(&self, owner: &str) -> bool {
        self.role == Role::Operator || self.principal == owner
    }

    /// How events and logs name this caller.
    pub fn actor(&self) -> String {
        if self.principal.is_empty() {
            "client".to_string()
        } else {
            self.principal.clone()
        }
    }

    /// The caller a handler runs as (set by the interceptor; anonymous if none ran).
    pub fn of<T>(request: &Request<T>) -> Caller {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or_else(Caller::anonymous)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    /// Serve tfsd.v1 without authentication on a non-loopback address (not recommended).
    allow_unauthenticated: Option<bool>,
    #[serde(default)]
    tokens: Vec<RawToken>,
    #[serde(default)]
    certificates: Vec<RawCertificate>,
    #[serde(default)]
    peers: Vec<RawPeer>,
}

/// `[[auth.peers]]`: a local user, known by the uid the kernel reports for a Unix-socket
/// peer, as a principal.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    uid: Option<u32>,
    /// A user name, looked up in the system's user database when the config is read.
    user: Option<String>,
    principal: String,
    role: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    principal: String,
    role: Option<String>,
    /// Hex SHA-256 of the token (`printf %s "$TOKEN" | sha256sum`).
    sha256: Option<String>,
    /// A file holding the token itself (its digest is taken at start-up).
    file: Option<std::path::PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertificate {
    principal: String,
    role: Option<String>,
    /// Hex SHA-256 of the client certificate in DER form
    /// (`openssl x509 -in client.pem -outform der | sha256sum`).
    sha256: String,
}

/// The validated credentials.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    pub allow_unauthenticated: bool,
    /// The token files read at start-up: secrets the workers' sandbox must never reach.
    pub token_files: Vec<PathBuf>,
    tokens: HashMap<[u8; 32], Caller>,
    certificates: HashMap<[u8; 32], Caller>,
    /// Unix-socket peers by uid (`[[auth.peers]]`).
    peers: HashMap<u32, Caller>,
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn parse_digest(key: &str, text: &str) -> anyhow::Result<[u8; 32]> {
    let bytes = hex::decode(text.trim())
        .ok()
        .filter(|bytes| bytes.len() == 32)
        .with_context(|| format!("{key} = {text:?} is not a hex SHA-256 digest (64 hex digits)"))?;
    let mut out = [0u8; 32];
    out.copy_from_slice(&bytes);
    Ok(out)
}

/// Whether a token file with permission bits `mode`, owned by `owner`, is readable by
/// nobody but its owner (and the group root chose for it).
///
/// No group or other bits, as OpenSSH asks of a private key, with the one exception
/// PostgreSQL makes for its key file: a file root owns may also be readable by its group
/// (0440, 0640), the administrator's deliberate choice of who reads it. That is how
/// Kubernetes mounts a Secret for a pod that does not run as root: root-owned, group
/// `fsGroup` (the pod's own), and the kubelet adds group read to the volume's files whatever
/// `defaultMode` says; and the classic `root:tfsd 0440` of a host that keeps secrets
/// root-owned.
fn token_file_is_private(mode: u32, owner: u32) -> bool {
    const GROUP_READ: u32 = 0o040;
    let exposed = mode & 0o077;
    exposed == 0 || (owner == 0 && exposed == GROUP_READ)
}

/// Refuses the token file at `path` if other users could read it (`token_file_is_private`).
fn check_token_file(key: &str, path: &Path, file: &std::fs::File) -> anyhow::Result<()> {
    let metadata = file
        .metadata()
        .with_context(|| format!("{key}.file: read the permissions of {}", path.display()))?;
    let mode = metadata.mode() & 0o7777;
    if token_file_is_private(mode, metadata.uid()) {
        return Ok(());
    }
    bail!(
        "{key}.file: {path} is readable by group or others (mode {mode:04o}): anyone they \
         include could use the token. Run `chmod 600 {path}` (tfsd refuses to start until \
         only its own user can read the file)",
        path = path.display()
    )
}

fn parse_role(key: &str, role: Option<&str>) -> anyhow::Result<Role> {
    match role {
        None | Some("client") => Ok(Role::Client),
        Some("operator") => Ok(Role::Operator),
        Some(other) => bail!("{key} = {other:?} is not one of \"client\", \"operator\""),
    }
}

impl AuthConfig {
    /// Validates the `[auth]` table; `base` resolves token files.
    pub fn from_raw(raw: RawAuth, base: &Path) -> anyhow::Result<AuthConfig> {
        let mut config = AuthConfig {
            allow_unauthenticated: raw.allow_unauthenticated.unwrap_or(false),
            ..AuthConfig::default()
        };
        for (index, token) in raw.tokens.into_iter().enumerate() {
            let key = format!("auth.tokens[{index}]");
            if token.principal.is_empty() {
                bail!("{key}.principal is empty");
            }
            let digest = match (&token.sha256, &token.file) {
                (Some(text), None) => parse_digest(&format!("{key}.sha256"), text)?,
                (None, Some(file)) => {
                    let path = base.join(file);
                    // One open: the mode checked is that of the file read.
                    let mut opened = std::fs::File::open(&path)
                        .with_context(|| format!("{key}.file: read {}", path.display()))?;
                    let mut text = String::new();
                    std::io::Read::read_to_string(&mut opened, &mut text)
                        .with_context(|| format!("{key}.file: read {}", path.display()))?;
                    let token = text.trim();
                    if token.len() < 16 {
                        bail!(
                            "{key}.file: the token in {} is shorter than 16 characters",
                            path.display()
                        );
                    }
                    check_token_file(&key, &path, &opened)?;
                    config.token_files.push(path.clone());
                    digest(token.as_bytes())
                }
                _ => bail!("{key} needs exactly one of sha256, file"),
            };
            let caller = Caller {
                role: parse_role(&format!("{key}.role"), token.role.as_deref())?,
                principal: token.principal,
            };
            if config.tokens.insert(digest, caller).is_some() {
                bail!("{key}: the same token is configured twice");
            }
        }
        for (index, certificate) in raw.certificates.into_iter().enumerate() {
            let key = format!("auth.certificates[{index}]");
            let digest = parse_digest(&format!("{key}.sha256"), &certificate.sha256)?;
            let caller = Caller {
                role: parse_role(&format!("{key}.role"), certificate.role.as_deref())?,
                principal: certificate.principal,
            };
            config.certificates.insert(digest, caller);
        }
        for (index, peer) in raw.peers.into_iter().enumerate() {
            let key = format!("auth.peers[{index}]");
            if peer.principal.is_empty() {
                bail!("{key}.principal is empty");
            }
            let uid = match (peer.uid, &peer.user) {
                (Some(uid), None) => uid,
                (None, Some(user)) => crate::unix_socket::lookup_user(
                    crate::unix_socket::AccountKey::Name(user),
                )
                .with_context(|| format!("{key}.user: look up {user:?}"))?
                .with_context(|| {
                    format!("{key}.user = {user:?} is not a user on this machine (getent passwd)")
                })?
                .0,
                _ => bail!("{key} needs exactly one of uid, user"),
            };
            let caller = Caller {
                role: parse_role(&format!("{key}.role"), peer.role.as_deref())?,
                principal: peer.principal,
            };
            if config.peers.insert(uid, caller).is_some() {
                bail!("{key}: uid {uid} is mapped twice");
            }
        }
        Ok(config)
    }

    /// Whether any credential is configured (then every call must present one). Peers count:
    /// with only `[[auth.peers]]`, TCP callers have nothing to present and are all refused.
    pub fn required(&self) -> bool {
        !self.tokens.is_empty() || !self.certificates.is_empty() || !self.peers.is_empty()
    }

    /// The uids `[[auth.peers]]` maps, with their callers, for reports.
    pub fn peers(&self) -> impl Iterator<Item = (u32, &Caller)> {
        self.peers.iter().map(|(uid, caller)| (*uid, caller))
    }

    /// The caller on the Unix socket: the bearer token's principal when a token is sent
    /// (a wrong token is refused), else the principal `[[auth.peers]]` maps the peer's uid to.
    /// `peer_uid` is `None` when the kernel did not report the peer's credentials. Without
    /// credentials configured, everyone is the anonymous operator, as on TCP.
    pub fn authenticate_unix_peer(
        &self,
        token: Option<&str>,
        peer_uid: Option<u32>,
    ) -> Result<Caller, Status> {
        if !self.required() || token.is_some() {
            return self.authenticate(token, &[]);
        }
        let Some(uid) = peer_uid else {
            return Err(Status::unauthenticated(
                "the kernel did not report this connection's peer credentials: send `authorization: Bearer TOKEN` metadata",
            ));
        };
        self.peers.get(&uid).cloned().ok_or_else(|| {
            Status::unauthenticated(format!(
                "uid {uid} is not mapped to a principal ([[auth.peers]]): send `authorization: Bearer TOKEN` metadata, or ask the operator to map the uid"
            ))
        })
    }

    /// The caller behind a request's credentials.
    pub fn authenticate(
        &self,
        token: Option<&str>,
        peer_certificates: &[Vec<u8>],
    ) -> Result<Caller, Status> {
        if !self.required() {
            return Ok(Caller::anonymous());
        }
        for certificate in peer_certificates {
            if let Some(caller) = self.certificates.get(&digest(certificate)) {
                return Ok(caller.clone());
            }
        }
        match token {
            Some(token) => self
                .tokens
                .get(&digest(token.as_bytes()))
                .cloned()
                .ok_or_else(|| Status::unauthenticated("the bearer token is not valid")),
            None if !peer_certificates.is_empty() => Err(Status::unauthenticated(
                "the client certificate is not one tfsd knows",
            )),
            None if self.tokens.is_empty() && self.certificates.is_empty() => {
                Err(Status::unauthenticated(
                    "only [[auth.peers]] are configured, and they apply to the Unix socket \
                     alone (server.unix_socket): connect there, or ask the operator for a token",
                ))
            }
            None => Err(Status::unauthenticated(
                "authentication required: send `authorization: Bearer TOKEN` metadata or a \
                 client certificate",
            )),
        }
    }
}

/// Which listener an interceptor guards: the peer's uid counts on the Unix socket only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Tcp,
    UnixSocket,
}

/// A tonic interceptor that authenticates every call and records the caller.
pub fn interceptor(
    config: Arc<AuthConfig>,
    listener: Listener,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |mut request: Request<()>| {
        let token = match request.metadata().get("authorization") {
            None => None,
            Some(value) => {
                let value = value
                    .to_str()
                    .map_err(|_| Status::unauthenticated("the authorization header is not text"))?;
                let token = value.strip_prefix("Bearer ").ok_or_else(|| {
                    Status::unauthenticated("the authorization header must be `Bearer TOKEN`")
                })?;
                Some(token.trim().to_string())
            }
        };
        let caller = match listener {
            Listener::Tcp => {
                let certificates: Vec<Vec<u8>> = request
                    .peer_certs()
                    .map(|certs| certs.iter().map(|cert| cert.to_vec()).collect())
                    .unwrap_or_default();
                config.authenticate(token.as_deref(), &certificates)?
            }
            Listener::UnixSocket => {
                // Set by tonic for every connection accepted on a Unix listener.
                let peer_uid = request
                    .extensions()
                    .get::<tonic::transport::server::UdsConnectInfo>()
                    .and_then(|info| info.peer_cred)
                    .map(|credentials| credentials.uid());
                config.authenticate_unix_peer(token.as_deref(), peer_uid)?
            }
        };
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> anyhow::Result<AuthConfig> {
        let raw: RawAuth = toml::from_str(text)?;
        AuthConfig::from_raw(raw, Path::new("."))
    }

    const ALICE: &str = "alice-token-0123456789";

    fn alice_digest() -> String {
        hex::encode(digest(ALICE.as_bytes()))
    }

    #[test]
    fn no_credentials_means_anonymous_operator() {
        let auth = config("").expect("valid");
        assert!(!auth.required());
        assert_eq!(
            auth.authenticate(None, &[]).expect("anonymous"),
            Caller::anonymous()
        );
    }

    #[test]
    fn tokens_map_to_principals_and_roles() {
        let auth = config(&format!(
            "[[tokens]]\nprincipal = \"alice\"\nsha256 = \"{}\"\n\
             [[tokens]]\nprincipal = \"ops\"\nrole = \"operator\"\nsha256 = \"{}\"\n",
            alice_digest(),
            hex::encode(digest(b"ops-token-abcdefghijkl"))
        ))
        .expect("valid");
        assert!(auth.required());
        let alice = auth.authenticate(Some(ALICE), &[]).expect("alice");
        assert_eq!(alice.principal, "alice");
        assert_eq!(alice.role, Role::Client);
        assert!(alice.may_access("alice") && !alice.may_access("bob"));
        let ops = auth
            .authenticate(Some("ops-token-abcdefghijkl"), &[])
            .expect("ops");
        assert!(ops.may_access("bob"));

        let missing = auth.authenticate(None, &[]).expect_err("no token");
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        let wrong = auth
            .authenticate(Some("guess"), &[])
            .expect_err("bad token");
        assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn certificates_map_by_digest() {
        let der = b"pretend DER bytes".to_vec();
        let auth = config(&format!(
            "[[certificates]]\nprincipal = \"trainer\"\nsha256 = \"{}\"\n",
            hex::encode(digest(&der))
        ))
        .expect("valid");
        let caller = auth.authenticate(None, &[der]).expect("known cert");
        assert_eq!(caller.principal, "trainer");
        let stranger = auth
            .authenticate(None, &[b"other".to_vec()])
            .expect_err("unknown cert");
        assert!(stranger.message().contains("certificate"));
    }

    #[test]
    fn unix_peers_map_by_uid_and_a_token_decides() {
        let auth = config(&format!(
            "[[peers]]\nuid = 1000\nprincipal = \"alice\"\n\
             [[peers]]\nuser = \"root\"\nprincipal = \"admin\"\nrole = \"operator\"\n\
             [[tokens]]\nprincipal = \"token-holder\"\nsha256 = \"{}\"\n",
            alice_digest()
        ))
        .expect("valid");
        assert!(auth.required());
        let alice = auth
            .authenticate_unix_peer(None, Some(1000))
            .expect("mapped");
        assert_eq!(
            (alice.principal.as_str(), alice.role),
            ("alice", Role::Client)
        );
        let admin = auth.authenticate_unix_peer(None, Some(0)).expect("by name");
        assert_eq!(
            (admin.principal.as_str(), admin.role),
            ("admin", Role::Operator)
        );
        let stranger = auth
            .authenticate_unix_peer(None, Some(4242))
            .expect_err("unmapped uid");
        assert_eq!(stranger.code(), tonic::Code::Unauthenticated);
        assert!(
            stranger.message().contains("uid 4242"),
            "{}",
            stranger.message()
        );
        // A token decides over the uid, both ways.
        let holder = auth
            .authenticate_unix_peer(Some(ALICE), Some(4242))
            .expect("token");
        assert_eq!(holder.principal, "token-holder");
        let wrong = auth
            .authenticate_unix_peer(Some("guess"), Some(1000))
            .expect_err("a wrong token is never ignored");
        assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
        assert!(auth.authenticate_unix_peer(None, None).is_err());
        // On TCP the uid means nothing: a peers-only config refuses every TCP caller.
        let peers_only = config("[[peers]]\nuid = 1000\nprincipal = \"alice\"\n").expect("valid");
        let refused = peers_only
            .authenticate(None, &[])
            .expect_err("no token on TCP");
        assert!(
            refused.message().contains("Unix socket"),
            "{}",
            refused.message()
        );
        // Without credentials, everyone is the anonymous operator there too.
        let open = config("").expect("valid");
        assert_eq!(
            open.authenticate_unix_peer(None, Some(4242)).expect("open"),
            Caller::anonymous()
        );
    }

    #[test]
    fn token_files_must_be_private() {
        for (mode, owner, private) in [
            (0o600, 1000, true),
            (0o400, 0, true),
            (0o644, 0, false),
            (0o640, 1000, false),
            (0o604, 1000, false),
            (0o660, 1000, false),
            (0o440, 1000, false),
            // Root's, readable by the group root chose: Kubernetes' Secret files (0440,
            // group fsGroup), a host's `root:tfsd 0440`.
            (0o440, 0, true),
            (0o640, 0, true),
            // ... but never when the group may write, or others may read.
            (0o460, 0, false),
            (0o444, 0, false),
            (0o644, 0, false),
        ] {
            assert_eq!(
                token_file_is_private(mode, owner),
                private,
                "mode {mode:o}, owner {owner}"
            );
        }
    }

    #[test]
    fn a_token_file_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("tfsd-auth-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("alice.token");
        std::fs::write(&path, format!("{ALICE}\n")).expect("token");
        let text = format!("[[tokens]]\nprincipal = \"alice\"\nfile = {:?}\n", path);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let error = format!("{:#}", config(&text).expect_err("0644"));
        assert!(error.contains("auth.tokens[0].file"), "{error}");
        assert!(error.contains("mode 0644"), "{error}");
        assert!(
            error.contains(&format!("chmod 600 {}", path.display())),
            "{error}"
        );
        assert!(!error.contains(ALICE), "the token is never echoed: {error}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(config(&text).expect("0600").required());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_entries_name_their_key() {
        for (text, key) in [
            (
                "[[tokens]]\nprincipal = \"a\"\nsha256 = \"xyz\"\n",
                "auth.tokens[0].sha256",
            ),
            ("[[tokens]]\nprincipal = \"a\"\n", "auth.tokens[0]"),
            (
                &format!(
                    "[[tokens]]\nprincipal = \"a\"\nrole = \"root\"\nsha256 = \"{}\"\n",
                    alice_digest()
                ),
                "auth.tokens[0].role",
            ),
            (
                "[[tokens]]\nprincipal = \"a\"\nfile = \"/nonexistent/token\"\n",
                "auth.tokens[0].file",
            ),
            ("[[peers]]\nprincipal = \"a\"\n", "auth.peers[0]"),
            (
                "[[peers]]\nuid = 1\nuser = \"root\"\nprincipal = \"a\"\n",
                "auth.peers[0]",
            ),
            (
                "[[peers]]\nuser = \"no-such-user-tfsd\"\nprincipal = \"a\"\n",
                "auth.peers[0].user",
            ),
            (
                "[[peers]]\nuid = 7\nprincipal = \"a\"\n[[peers]]\nuid = 7\nprincipal = \"b\"\n",
                "auth.peers[1]",
            ),
            (
                "[[peers]]\nuid = 7\nprincipal = \"a\"\nrole = \"root\"\n",
                "auth.peers[0].role",
            ),
        ] {
            let error = config(text).expect_err(text);
            assert!(format!("{error:#}").contains(key), "{text}: {error:#}");
        }
    }
}
