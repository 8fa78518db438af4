//! What a worker must be able to read, found in the supervisor: the system's libraries and
//! the few files of /etc that the C library and Python read, /proc and /sys, a handful of
//! devices, and per program: the program, its ELF run path (libtensorflow, whose files may
//! be links into another directory), LD_LIBRARY_PATH and PYTHONPATH, and for a Python
//! interpreter its virtual environment, the installation it belongs to (a venv's python is
//! a link into e.g. /root/.pyenv/versions/3.11.7) and what the environment's `.pth` files
//! add to `sys.path`.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::landlock::{IOCTL_DEV, READ, READ_EXECUTE, READ_FILE, TRUNCATE, WRITE_FILE};

/// One Landlock rule: access rights on a path and everything beneath it.
pub type Rule = (PathBuf, u64);

/// System directories: libraries, programs (the ELF interpreter itself is "executed").
const SYSTEM_READ_EXECUTE: [&str; 8] = [
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/nix/store",
];

/// Files of /etc that the dynamic loader, the C library (names, time zone, resolver), TLS
/// and fontconfig (matplotlib, imported by Keras' plotting utilities) read, and
/// fontconfig's cache. Not /etc as a whole: /etc/shadow, /etc/ssh and the daemon's own
/// config stay out of reach.
const SYSTEM_ETC: [&str; 27] = [
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/ld.so.preload",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/nsswitch.conf",
    "/etc/passwd",
    "/etc/group",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/resolv.conf",
    "/etc/gai.conf",
    "/etc/services",
    "/etc/protocols",
    // Certificates and OpenSSL's config, never /etc/ssl/private or /etc/pki/tls/private.
    "/etc/ssl/certs",
    "/etc/ssl/openssl.cnf",
    "/etc/ca-certificates",
    "/etc/pki/tls/certs",
    "/etc/pki/tls/openssl.cnf",
    "/etc/pki/ca-trust",
    "/etc/alternatives",
    "/etc/os-release",
    "/etc/lsb-release",
    "/etc/mime.types",
    "/etc/fonts",
    "/var/cache/fontconfig",
];

/// Read-only: /proc (Landlock's ptrace restrictions keep other processes' environ, mem,
/// maps and fds unreadable) and /sys (CPU topology, cgroup limits).
const SYSTEM_READ: [&str; 2] = ["/proc", "/sys"];

/// The rules every worker gets, whatever its program.
pub fn system_rules() -> Vec<Rule> {
    let mut rules: Vec<Rule> = Vec::new();
    rules.extend(
        SYSTEM_READ_EXECUTE
            .iter()
            .map(|path| (PathBuf::from(path), READ_EXECUTE)),
    );
    rules.extend(SYSTEM_ETC.iter().map(|path| (PathBuf::from(path), READ)));
    rules.extend(SYSTEM_READ.iter().map(|path| (PathBuf::from(path), READ)));
    for device in ["/dev/null", "/dev/zero", "/dev/full"] {
        rules.push((device.into(), READ_FILE | WRITE_FILE | TRUNCATE));
    }
    for device in ["/dev/urandom", "/dev/random"] {
        rules.push((device.into(), READ_FILE));
    }
    // NVIDIA GPUs: TensorFlow talks to the driver through ioctls on these device nodes.
    if let Ok(entries) = std::fs::read_dir("/dev") {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with("nvidia") {
                rules.push((entry.path(), READ_FILE | WRITE_FILE | IOCTL_DEV));
            }
        }
    }
    rules
}

/// The rules one program needs: itself and its directory, its run path, the directories of
/// `library_dir` and of the library and Python path variables in `env` (the worker's) or,
/// where `env` does not set them, in the daemon's environment, and for a Python interpreter
/// its environment and installation.
pub fn program_rules(
    program: &Path,
    library_dir: Option<&Path>,
    env: &BTreeMap<String, String>,
) -> Vec<Rule> {
    let mut read_execute: Vec<PathBuf> = Vec::new();
    let canonical = std::fs::canonicalize(program).unwrap_or_else(|_| program.to_path_buf());
    for path in [program, canonical.as_path()] {
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            read_execute.push(dir.to_path_buf());
        }
    }
    read_execute.push(canonical.clone());
    let mut library_dirs = elf_run_path(&canonical);
    library_dirs.extend(library_dir.map(Path::to_path_buf));
    let variable = |name: &str| -> Option<std::ffi::OsString> {
        match env.get(name) {
            Some(value) => Some(value.into()),
            None => std::env::var_os(name),
        }
    };
    for name in ["LD_LIBRARY_PATH", "PYTHONPATH"] {
        if let Some(value) = variable(name) {
            library_dirs.extend(std::env::split_paths(&value).filter(|dir| dir.is_absolute()));
        }
    }
    if let Some(home) = variable("PYTHONHOME") {
        library_dirs.push(home.into());
    }
    for dir in &library_dirs {
        read_execute.extend(link_target_dirs(dir));
    }
    read_execute.extend(library_dirs);
    if is_python(&canonical) {
        read_execute.extend(python_dirs(program, &canonical));
    }
    read_execute.sort();
    read_execute.dedup();
    read_execute
        .into_iter()
        .map(|path| (path, READ_EXECUTE))
        .collect()
}

fn is_python(canonical: &Path) -> bool {
    canonical
        .file_name()
        .and_then(OsStr::to_str)
        .is_some_and(|name| name.starts_with("python"))
}

/// The directories that the symbolic links directly in `dir` point into
/// (`.cache/libtensorflow/lib/libtensorflow_cc.so.2` is a link into `wheel-libs/`): Landlock
/// checks the file a link resolves to.
fn link_target_dirs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut dirs = Vec::new();
    for entry in entries.flatten().take(10_000) {
        if entry.file_type().is_ok_and(|kind| kind.is_symlink())
            && let Ok(target) = std::fs::canonicalize(entry.path())
            && let Some(parent) = target.parent()
            && !parent.starts_with(dir)
            && !dirs.iter().any(|known: &PathBuf| known == parent)
        {
            dirs.push(parent.to_path_buf());
        }
    }
    dirs
}

/// A Python interpreter's directories: the virtual environment it is run from (the
/// directory above `bin/` holding `pyvenv.cfg`), the installation behind it (pyvenv.cfg's
/// `home`, and the first directory above the real executable that holds `lib/python3*`),
/// and the directories the environment's `.pth` files add (`pip install -e`).
fn python_dirs(program: &Path, canonical: &Path) -> Vec<PathBuf> {
    let mut prefixes = Vec::new();
    if let Some(venv) = program.parent().and_then(Path::parent)
        && let Ok(config) = std::fs::read_to_string(venv.join("pyvenv.cfg"))
    {
        prefixes.push(venv.to_path_buf());
        let home = config.lines().find_map(|line| {
            let (key, value) = line.split_once('=')?;
            (key.trim() == "home").then(|| PathBuf::from(value.trim()))
        });
        // Not `/` (a venv made from /bin/python3): /usr is granted anyway.
        if let Some(prefix) = home.as_deref().and_then(Path::parent)
            && prefix.parent().is_some()
        {
            prefixes.push(prefix.to_path_buf());
        }
    }
    // The interpreter's own prefix, never `/` (merged-/usr systems have /lib/python3*).
    if let Some(prefix) = canonical
        .ancestors()
        .skip(1)
        .take_while(|dir| dir.parent().is_some())
        .find(|dir| !python_lib_dirs(dir).is_empty())
    {
        prefixes.push(prefix.to_path_buf());
    }
    let mut dirs = prefixes.clone();
    for prefix in &prefixes {
        for lib in python_lib_dirs(prefix) {
            dirs.extend(pth_dirs(&lib.join("site-packages")));
        }
    }
    dirs
}

/// `PREFIX/lib/python3*` directories.
fn python_lib_dirs(prefix: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(prefix.join("lib")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("python3"))
        .map(|entry| entry.path())
        .filter(|path| path.is_dir())
        .collect()
}

/// What `.pth` files in `site_packages` put on `sys.path`: their path lines, and the
/// absolute paths an editable install's finder module maps packages to.
fn pth_dirs(site_packages: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(site_packages) else {
        return Vec::new();
    };
    let mut dirs = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let editable_finder = name.starts_with("__editable__") && name.ends_with(".py");
        if !name.ends_with(".pth") && !editable_finder {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        if editable_finder {
            dirs.extend(quoted_absolute_paths(&text));
            continue;
        }
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') || line.starts_with("import") {
                continue;
            }
            let dir = site_packages.join(line);
            if dir.is_dir() {
                dirs.push(dir);
            }
        }
    }
    dirs
}

/// Quoted absolute paths that exist, in a Python source (an editable finder's MAPPING).
fn quoted_absolute_paths(text: &str) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    for quote in ['\'', '"'] {
        for (index, piece) in text.split(quote).enumerate() {
            if index % 2 == 1 && piece.starts_with('/') && Path::new(piece).exists() {
                paths.push(PathBuf::from(piece));
            }
        }
    }
    paths
}

/// The directories of an ELF file's DT_RUNPATH and DT_RPATH (64-bit little-endian files
/// only; anything else has none), with `$ORIGIN` expanded. tfsd-worker built here carries
/// the libtensorflow directory this way.
pub fn elf_run_path(program: &Path) -> Vec<PathBuf> {
    read_run_path(program).unwrap_or_default()
}

fn read_run_path(program: &Path) -> Option<Vec<PathBuf>> {
    const PT_LOAD: u32 = 1;
    const PT_DYNAMIC: u32 = 2;
    const DT_NULL: u64 = 0;
    const DT_STRTAB: u64 = 5;
    const DT_RPATH: u64 = 15;
    const DT_RUNPATH: u64 = 29;
    let file = std::fs::File::open(program).ok()?;
    let read = |offset: u64, length: usize| -> Option<Vec<u8>> {
        let mut bytes = vec![0; length];
        file.read_exact_at(&mut bytes, offset).ok()?;
        Some(bytes)
    };
    let header = read(0, 64)?;
    // ELF magic, 64-bit, little-endian.
    if header[..4] != *b"\x7fELF" || header[4] != 2 || header[5] != 1 {
        return None;
    }
    let program_headers = le_u64(&header, 0x20)?;
    let entry_size = le_u16(&header, 0x36)? as usize;
    let entries = le_u16(&header, 0x38)? as usize;
    if entry_size < 56 || entries > 1024 {
        return None;
    }
    let table = read(program_headers, entry_size * entries)?;
    let mut loads = Vec::new();
    let mut dynamic = None;
    for entry in table.chunks_exact(entry_size) {
        let (kind, offset, address, size) = (
            le_u32(entry, 0)?,
            le_u64(entry, 8)?,
            le_u64(entry, 16)?,
            le_u64(entry, 32)?,
        );
        match kind {
            PT_LOAD => loads.push((address, offset, size)),
            PT_DYNAMIC => dynamic = Some((offset, size.min(1 << 16))),
            _ => {}
        }
    }
    let (offset, size) = dynamic?;
    let section = read(offset, size as usize)?;
    let mut string_table = None;
    let mut run_paths = Vec::new();
    for entry in section.chunks_exact(16) {
        let (tag, value) = (le_u64(entry, 0)?, le_u64(entry, 8)?);
        match tag {
            DT_NULL => break,
            DT_STRTAB => string_table = Some(value),
            DT_RPATH | DT_RUNPATH => run_paths.push(value),
            _ => {}
        }
    }
    let address = string_table?;
    let strings = loads
        .iter()
        .find(|(start, _, size)| (*start..start.saturating_add(*size)).contains(&address))
        .map(|(start, offset, _)| address - start + offset)?;
    let origin = program.parent()?.to_string_lossy().to_string();
    let mut dirs = Vec::new();
    for at in run_paths {
        let mut bytes = vec![0; 4096];
        let length = file.read_at(&mut bytes, strings.checked_add(at)?).ok()?;
        bytes.truncate(length);
        let end = bytes.iter().position(|byte| *byte == 0)?;
        let text = String::from_utf8_lossy(&bytes[..end]).to_string();
        for dir in text.split(':').filter(|dir| !dir.is_empty()) {
            let dir = dir
                .replace("${ORIGIN}", &origin)
                .replace("$ORIGIN", &origin);
            dirs.push(PathBuf::from(dir));
        }
    }
    Some(dirs)
}

fn le_u16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn le_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn le_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_path_of_an_elf_file_is_read() {
        // The worker built here carries libtensorflow's directory as its run path.
        let worker = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/debug/tfsd-worker");
        if worker.is_file() {
            let dirs = elf_run_path(&worker);
            assert!(
                dirs.iter()
                    .any(|dir| dir.ends_with(".cache/libtensorflow/lib")),
                "{dirs:?}"
            );
        }
        assert!(elf_run_path(Path::new("/etc/passwd")).is_empty());
    }

    #[test]
    fn editable_finders_name_their_sources() {
        let text = "MAPPING = {'tfsd_worker': '/usr/lib', 'x': '/does/not/exist'}\n";
        assert_eq!(quoted_absolute_paths(text), [PathBuf::from("/usr/lib")]);
    }
}
