//! Bounds on what a client sends besides tensors and graphs: session ids, tensor names,
//! labels, a script's path and arguments. They hold for tfsd.v1 and the MasterService alike.
//!
//! They are constants, not operator settings: each sits far above anything a real client
//! sends, and exists so that one client's input can neither grow what the daemon keeps and
//! answers to everyone (a 5 MiB label made every later ListSessions bigger than a client's
//! 4 MiB receive limit) nor be echoed whole into an error (a 16 MiB session id quoted in its
//! NOT_FOUND exceeded gRPC's metadata limit, so the client saw a transport error). Errors
//! quote client strings through `crate::error::quoted`, never whole.

use crate::error::{Error, quoted};

/// The longest session id (or MasterService session handle) a request may name. The daemon
/// makes ids of 34 bytes (`s-` and a UUID's 32 hex digits); 128 leaves room without
/// letting an id be a payload.
pub const MAX_ID_BYTES: usize = 128;

/// Labels one session may carry. Labels are for operators to tell sessions apart
/// ("experiment": "lr-sweep-3"), not a store: a handful is typical.
pub const MAX_LABELS: usize = 32;
/// The longest label key: room for a prefixed key in Kubernetes' style
/// (`example.com/team`, a 63-byte name and a domain prefix).
pub const MAX_LABEL_KEY_BYTES: usize = 128;
/// The longest label value: room for a run's description or a path, not for data.
pub const MAX_LABEL_VALUE_BYTES: usize = 1024;
/// Keys and values of one session's labels together. Every session's labels are in every
/// ListSessions answer: at 4 KiB each, 900 sessions still fit in the 4 MiB that gRPC
/// clients accept by default.
pub const MAX_LABELS_BYTES: usize = 4096;
/// Labels under this prefix are the daemon's (`tfsd.origin=master` marks a MasterService
/// session, which the MasterService takes over again after a restart); clients may not set
/// them. Matched without regard to case, so that `TFSD.origin` cannot pass for the real one.
pub const RESERVED_LABEL_PREFIX: &str = "tfsd.";

/// The longest tensor or operation name (a feed, fetch or target, `scope/op:0`). TensorFlow
/// sets no bound; deeply scoped Keras names stay under 300 bytes.
pub const MAX_NAME_BYTES: usize = 1024;
/// Names in one list of a request (feeds, fetches, targets, Reset's containers). A step of a
/// large Keras model fetches and targets a few hundred.
pub const MAX_NAMES: usize = 10_000;

/// The longest script path (Linux's PATH_MAX).
pub const MAX_SCRIPT_PATH_BYTES: usize = 4096;
/// Arguments of one script (`sys.argv[1:]`).
pub const MAX_SCRIPT_ARGS: usize = 4096;
/// The longest script argument (Linux's MAX_ARG_STRLEN).
pub const MAX_SCRIPT_ARG_BYTES: usize = 128 << 10;
/// Every script argument together (Linux's default ARG_MAX, 2 MiB).
pub const MAX_SCRIPT_ARGS_BYTES: usize = 2 << 20;

/// A session id (or handle) within `MAX_ID_BYTES`; `field` names it as the request does.
pub fn check_id(field: &str, id: &str) -> Result<(), Error> {
    if id.len() > MAX_ID_BYTES {
        return Err(Error::InvalidArgument(format!(
            "{field} {} is {} bytes; session ids are at most {MAX_ID_BYTES} bytes",
            quoted(id),
            id.len()
        )));
    }
    Ok(())
}

/// A list of tensor or operation names: at most `MAX_NAMES`, each at most
/// `MAX_NAME_BYTES`. `field` names the list as the request does ("fetches").
pub fn check_names<'a>(
    field: &str,
    names: impl ExactSizeIterator<Item = &'a str>,
) -> Result<(), Error> {
    if names.len() > MAX_NAMES {
        return Err(Error::InvalidArgument(format!(
            "{field} has {} names; a request may name at most {MAX_NAMES}",
            names.len()
        )));
    }
    for name in names {
        check_name(field, name)?;
    }
    Ok(())
}

/// One tensor or operation name within `MAX_NAME_BYTES`.
pub fn check_name(field: &str, name: &str) -> Result<(), Error> {
    if name.len() > MAX_NAME_BYTES {
        return Err(Error::InvalidArgument(format!(
            "{field}: the name {} is {} bytes; names are at most {MAX_NAME_BYTES} bytes",
            quoted(name),
            name.len()
        )));
    }
    Ok(())
}

/// Labels a client asks for: within the sizes (`check_labels`), and none under
/// `RESERVED_LABEL_PREFIX`.
pub fn check_client_labels<'a>(
    labels: impl IntoIterator<Item = (&'a String, &'a String)> + Clone,
) -> Result<(), Error> {
    for (key, _) in labels.clone() {
        if is_reserved(key) {
            return Err(Error::InvalidArgument(format!(
                "label {} is reserved: keys starting with {RESERVED_LABEL_PREFIX:?} are the \
                 daemon's own; choose another key",
                quoted(key)
            )));
        }
    }
    check_labels(labels)
}

/// Whether `key` is under `RESERVED_LABEL_PREFIX`.
pub fn is_reserved(key: &str) -> bool {
    key.as_bytes()
        .get(..RESERVED_LABEL_PREFIX.len())
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case(RESERVED_LABEL_PREFIX.as_bytes()))
}

/// A session's labels, whoever sets them: at most `MAX_LABELS`, keys non-empty and within
/// `MAX_LABEL_KEY_BYTES`, values within `MAX_LABEL_VALUE_BYTES`, all of them within
/// `MAX_LABELS_BYTES`, and no control characters (labels are printed in `tfsd sessions`
/// tables and logs, where a newline could forge a row).
pub fn check_labels<'a>(
    labels: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Result<(), Error> {
    let invalid = |message: String| Err(Error::InvalidArgument(message));
    let mut count = 0;
    let mut total = 0;
    for (key, value) in labels {
        count += 1;
        total += key.len() + value.len();
        if key.is_empty() {
            return invalid("a label key is empty".into());
        }
        if key.len() > MAX_LABEL_KEY_BYTES {
            return invalid(format!(
                "label key {} is {} bytes; keys are at most {MAX_LABEL_KEY_BYTES} bytes",
                quoted(key),
                key.len()
            ));
        }
        if value.len() > MAX_LABEL_VALUE_BYTES {
            return invalid(format!(
                "label {}: the value is {} bytes; values are at most \
                 {MAX_LABEL_VALUE_BYTES} bytes",
                quoted(key),
                value.len()
            ));
        }
        if key.chars().chain(value.chars()).any(char::is_control) {
            return invalid(format!(
                "label {} holds a control character (a newline, a tab, ...)",
                quoted(key)
            ));
        }
    }
    if count > MAX_LABELS {
        return invalid(format!(
            "{count} labels; a session may have at most {MAX_LABELS}"
        ));
    }
    if total > MAX_LABELS_BYTES {
        return invalid(format!(
            "the labels' keys and values are {total} bytes together; at most \
             {MAX_LABELS_BYTES} bytes"
        ));
    }
    Ok(())
}

/// A Python script's path and arguments within the kernel's own bounds for a command line.
pub fn check_script(path: &str, argv: &[String]) -> Result<(), Error> {
    let invalid = |message: String| Err(Error::InvalidArgument(message));
    if path.len() > MAX_SCRIPT_PATH_BYTES {
        return invalid(format!(
            "script.path is {} bytes; at most {MAX_SCRIPT_PATH_BYTES}",
            path.len()
        ));
    }
    if argv.len() > MAX_SCRIPT_ARGS {
        return invalid(format!(
            "script.argv has {} arguments; at most {MAX_SCRIPT_ARGS}",
            argv.len()
        ));
    }
    if let Some((index, arg)) = argv
        .iter()
        .enumerate()
        .find(|(_, arg)| arg.len() > MAX_SCRIPT_ARG_BYTES)
    {
        return invalid(format!(
            "script.argv[{index}] is {} bytes; at most {MAX_SCRIPT_ARG_BYTES}",
            arg.len()
        ));
    }
    let total: usize = argv.iter().map(String::len).sum();
    if total > MAX_SCRIPT_ARGS_BYTES {
        return invalid(format!(
            "script.argv is {total} bytes together; at most {MAX_SCRIPT_ARGS_BYTES}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn message(result: Result<(), Error>) -> String {
        match result {
            Err(Error::InvalidArgument(message)) => message,
            other => panic!("not INVALID_ARGUMENT: {other:?}"),
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect()
    }

    #[test]
    fn ids_are_bounded_and_quoted_short() {
        assert!(check_id("session_id", &"s".repeat(MAX_ID_BYTES)).is_ok());
        let text = message(check_id("session_id", &"s".repeat(16 << 20)));
        assert!(text.starts_with("session_id \"sss"), "{text}");
        assert!(text.contains(&format!("is {} bytes", 16 << 20)), "{text}");
        assert!(text.len() < 300, "{text}");
    }

    #[test]
    fn names_are_bounded_in_size_and_number() {
        let long = "n".repeat(MAX_NAME_BYTES + 1);
        let text = message(check_names("fetches", ["y:0", long.as_str()].into_iter()));
        assert!(text.starts_with("fetches: the name \"nnn"), "{text}");
        assert!(text.len() < 300, "{text}");
        let many = vec!["y:0"; MAX_NAMES + 1];
        let text = message(check_names("targets", many.iter().copied()));
        assert!(text.contains("at most 10000"), "{text}");
        assert!(check_names("feeds", vec!["x"; MAX_NAMES].into_iter()).is_ok());
    }

    #[test]
    fn reserved_labels_are_refused_by_name_whatever_their_case() {
        for key in ["tfsd.origin", "TFSD.origin", "tfsd.master.client", "Tfsd."] {
            let text = message(check_client_labels(&labels(&[
                ("run", "1"),
                (key, "master"),
            ])));
            assert!(text.contains(&format!("{key:?} is reserved")), "{text}");
        }
        assert!(check_client_labels(&labels(&[("tfsd", "x"), ("my.tfsd.x", "y")])).is_ok());
        // The daemon's own labels pass the size checks.
        assert!(check_labels(&labels(&[("tfsd.origin", "master")])).is_ok());
    }

    #[test]
    fn labels_are_bounded() {
        let key = "k".repeat(MAX_LABEL_KEY_BYTES);
        let value = "v".repeat(MAX_LABEL_VALUE_BYTES);
        assert!(check_labels(&labels(&[(&key, &value)])).is_ok());
        let long_key = "k".repeat(MAX_LABEL_KEY_BYTES + 1);
        assert!(message(check_labels(&labels(&[(&long_key, "v")]))).contains("label key \"kkk"));
        let huge = "v".repeat(5 << 20);
        let text = message(check_labels(&labels(&[("notes", &huge)])));
        assert!(
            text.starts_with("label \"notes\": the value is 5242880 bytes"),
            "{text}"
        );
        let many: BTreeMap<String, String> = (0..=MAX_LABELS)
            .map(|index| (format!("k{index}"), String::new()))
            .collect();
        assert!(message(check_labels(&many)).contains("at most 32"));
        let wide: BTreeMap<String, String> = (0..5)
            .map(|index| (format!("k{index}"), "v".repeat(MAX_LABEL_VALUE_BYTES)))
            .collect();
        assert!(message(check_labels(&wide)).contains("together"));
        assert!(message(check_labels(&labels(&[("", "v")]))).contains("empty"));
        assert!(message(check_labels(&labels(&[("a", "x\ny")]))).contains("control"));
    }

    #[test]
    fn scripts_are_bounded_like_a_command_line() {
        assert!(check_script("train.py", &["--lr".into(), "0.1".into()]).is_ok());
        assert!(message(check_script(&"p".repeat(5000), &[])).contains("script.path"));
        let arg = "a".repeat(MAX_SCRIPT_ARG_BYTES + 1);
        assert!(message(check_script("t.py", &[arg])).contains("script.argv[0]"));
        let args = vec!["a".repeat(100 << 10); 21];
        assert!(message(check_script("t.py", &args)).contains("together"));
        let args = vec![String::new(); MAX_SCRIPT_ARGS + 1];
        assert!(message(check_script("t.py", &args)).contains("arguments"));
    }
}
