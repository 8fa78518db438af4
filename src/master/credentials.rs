//! Who creates a MasterService session: the credentials a TensorFlow client can send, and
//! whether a client without them is let in.
//!
//! TensorFlow's client sends no metadata with its calls; the one thing of its own it sends
//! is the ConfigProto of CreateSession, whole. So the token travels there, in TensorFlow's
//! field for describing a session, `experimental.session_metadata.name`, on a line of its own
//! after the session's name: `NAME\ntfsd-token=TOKEN` (`tfsd_client.session_config(name,
//! token=...)` writes it). The split is unambiguous: a name cannot hold a newline (label
//! values refuse control characters) and neither can a bearer token (it travels in an HTTP
//! header over tfsd.v1). The token maps to a principal and a role through the same
//! `[[auth.tokens]]` as tfsd.v1's bearer tokens, and that principal owns the session.
//!
//! Every later call (RunStep, ExtendSession, CloseSession, ...) names the session by its
//! handle and carries no credentials, since TensorFlow's client sends none: the handle is
//! the capability. It is the tfsd session id, `s-` and a version 4 UUID: 122 bits from the
//! operating system's random number generator, never guessed, shown through tfsd.v1 only to
//! the session's owner and to operators.
//!
//! The token is never logged, echoed in an error, stored or passed on: `Token`'s `Debug`
//! hides it, `convert::session_config` removes `session_metadata` from the ConfigProto the
//! worker and the state directory get, and no message quotes the name field's second line.

use std::sync::Arc;

use tonic::Status;

use crate::auth::{AuthConfig, Caller};

/// What starts the name field's second line: the rest of the line is the token.
pub const TOKEN_PREFIX: &str = "tfsd-token=";

/// A token a TensorFlow client sent with CreateSession.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("Token(<redacted>)")
    }
}

/// `session_metadata.name` split into the session's name and the token, if the client sent
/// one.
pub fn split_name(field: &str) -> Result<(&str, Option<Token>), Status> {
    let Some((name, credential)) = field.split_once('\n') else {
        // A token on the first line (the newline lost) would otherwise be kept as the
        // session's name, in a label anyone who lists the session sees.
        if field.starts_with(TOKEN_PREFIX) {
            return Err(Status::invalid_argument(format!(
                "config.experimental.session_metadata.name starts with `{TOKEN_PREFIX}` on its \
                 first line; the token goes on a second line: write the config with \
                 tfsd_client.session_config(name, token=...)"
            )));
        }
        return Ok((field, None));
    };
    match credential.strip_prefix(TOKEN_PREFIX) {
        Some(token) => Ok((name, Some(Token(token.trim().to_string())))),
        None => Err(Status::invalid_argument(format!(
            "config.experimental.session_metadata.name has a second line that is not \
             `{TOKEN_PREFIX}TOKEN` (it is not quoted here, in case it is a credential): write \
             the config with tfsd_client.session_config(name, token=...)"
        ))),
    }
}

/// Who may create MasterService sessions: with `[auth]` credentials configured, a client
/// with a valid token, and one without only if `master.allow_unauthenticated` says so;
/// without, every client, as the anonymous owner-less caller it always was.
#[derive(Debug, Clone)]
pub struct MasterAccess {
    auth: Arc<AuthConfig>,
    allow_unauthenticated: bool,
}

/// How a refused client learns what to send.
const HOW_TO_AUTHENTICATE: &str = "pass your tfsd token in the session's ConfigProto: \
     tf.compat.v1.Session(target, config=tfsd_client.session_config(NAME, token=TOKEN)) \
     (docs/MASTER_SERVICE.md, \"Credentials\")";

impl MasterAccess {
    pub fn new(auth: Arc<AuthConfig>, allow_unauthenticated: bool) -> MasterAccess {
        MasterAccess {
            auth,
            allow_unauthenticated,
        }
    }

    /// The caller that creates a session: `Some` for a valid token, `None` for a client the
    /// MasterService serves without credentials (no `[auth]`, or
    /// `master.allow_unauthenticated`). A token sent to a daemon without `[auth]` is ignored,
    /// as tfsd.v1 ignores a bearer token there.
    pub fn caller(&self, token: Option<&Token>) -> Result<Option<Caller>, Status> {
        if !self.auth.required() {
            return Ok(None);
        }
        match token {
            Some(Token(token)) => {
                self.auth
                    .authenticate(Some(token), &[])
                    .map(Some)
                    .map_err(|_| {
                        Status::unauthenticated(
                            "the tfsd token in the session's ConfigProto is not valid (it is one \
                         of the daemon's [[auth.tokens]], as for tfsd.v1; \
                         tfsd_client.session_config(NAME, token=TOKEN) puts it there)",
                        )
                    })
            }
            None if self.allow_unauthenticated => Ok(None),
            None => Err(Status::unauthenticated(format!(
                "this tfsd requires credentials ([auth] is configured): {HOW_TO_AUTHENTICATE}"
            ))),
        }
    }

    /// Reset carries nothing but container names (TensorFlow's ResetRequest has no
    /// ConfigProto), so it reaches only the sessions of clients without credentials, and is
    /// refused where those are not let in.
    pub fn check_reset(&self) -> Result<(), Status> {
        if self.auth.required() && !self.allow_unauthenticated {
            return Err(Status::unauthenticated(
                "Reset carries no credentials (TensorFlow's client sends none with it), and \
                 this tfsd requires them: reset a session through tfsd.v1 with your token \
                 instead (tfsd_client.connect(ADDRESS, token=TOKEN).purge(ID), or \
                 `tfsd purge ID`)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: &str = "alice-master-token-0123";

    fn access(tokens: bool, allow_unauthenticated: bool) -> MasterAccess {
        let text = if tokens {
            use sha2::Digest;
            format!(
                "[[tokens]]\nprincipal = \"alice\"\nsha256 = \"{}\"\n",
                hex::encode(sha2::Sha256::digest(ALICE.as_bytes()))
            )
        } else {
            String::new()
        };
        let raw = toml::from_str(&text).expect("toml");
        let auth = AuthConfig::from_raw(raw, std::path::Path::new(".")).expect("auth");
        MasterAccess::new(Arc::new(auth), allow_unauthenticated)
    }

    fn token(text: &str) -> Token {
        Token(text.to_string())
    }

    #[test]
    fn the_token_rides_on_the_names_second_line() {
        assert_eq!(split_name("exp-1").expect("plain"), ("exp-1", None));
        assert_eq!(
            split_name(&format!("exp-1\n{TOKEN_PREFIX}{ALICE}")).expect("with a token"),
            ("exp-1", Some(token(ALICE)))
        );
        assert_eq!(
            split_name(&format!("\n{TOKEN_PREFIX}{ALICE}")).expect("no name"),
            ("", Some(token(ALICE)))
        );
        let status = split_name("exp-1\nsecret-looking-thing").expect_err("not a token line");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            !status.message().contains("secret-looking-thing"),
            "{status:?}"
        );
        assert_eq!(format!("{:?}", token(ALICE)), "Token(<redacted>)");
    }

    #[test]
    fn with_tokens_configured_a_client_proves_who_it_is() {
        let access = access(true, false);
        let alice = access
            .caller(Some(&token(ALICE)))
            .expect("valid")
            .expect("authenticated");
        assert_eq!(alice.principal, "alice");

        let wrong = access
            .caller(Some(&token("guessed-token-0000000")))
            .expect_err("wrong");
        assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
        assert!(!wrong.message().contains("guessed"), "{wrong:?}");

        let missing = access.caller(None).expect_err("none");
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        assert!(
            missing.message().contains("tfsd_client.session_config"),
            "{missing:?}"
        );
        assert_eq!(
            access.check_reset().expect_err("no credentials").code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn an_operator_may_let_clients_without_credentials_in() {
        let access = access(true, true);
        assert_eq!(access.caller(None).expect("allowed"), None);
        assert!(access.caller(Some(&token(ALICE))).expect("valid").is_some());
        assert!(access.check_reset().is_ok());
    }

    #[test]
    fn without_auth_nothing_changes() {
        let access = access(false, false);
        assert_eq!(access.caller(None).expect("open"), None);
        assert_eq!(
            access.caller(Some(&token("anything"))).expect("ignored"),
            None
        );
        assert!(access.check_reset().is_ok());
    }
}
