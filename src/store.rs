//! Durable sessions: what a session is (graph, config, labels, owner, limits) in an SQLite
//! database in the state directory, and variable checkpoints as files beside it, so that
//! after a restart — clean or `kill -9` — sessions come back under the same ids.
//!
//! Why SQLite (rusqlite, bundled): every change is one transaction that survives a crash at
//! any instant (WAL, synchronous=FULL), and an operator can inspect the state with the
//! `sqlite3` tool. Checkpoints can be gigabytes, so they are files, written atomically (a
//! temporary file, fsync, rename, fsync of the directory); the database names the one that
//! is current.
//!
//! What tfsd keeps here is tfsd's alone: graphs, configs and variables are the clients' data.
//! The directories are made (or tightened to) mode 0700 and every file written is 0600,
//! whatever the process's umask: set explicitly on creation (`private_file`), and checked
//! again after SQLite opens, since SQLite creates its `-wal` and `-shm` files with the
//! database file's permissions.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use prost::Message;
use rusqlite::{Connection, OptionalExtension, params};

use crate::policy::{GentleAction, SessionPolicy};
use crate::proto::tfsd::worker::v1::{NamedTensor, Variables};

/// Everything needed to bring a session back.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRecord {
    pub id: String,
    pub owner: String,
    pub labels: BTreeMap<String, String>,
    pub config: Vec<u8>,
    pub graph_def: Vec<u8>,
    pub graph_version: u64,
    pub policy: SessionPolicy,
    /// Variables are checkpointed and restored too.
    pub durable_variables: bool,
    pub created_at: SystemTime,
}

#[derive(Debug)]
pub struct SessionStore {
    connection: Mutex<Connection>,
    checkpoints: PathBuf,
}

fn seconds(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs() as i64)
}

/// Mode of the state directory and its `checkpoints` directory: the daemon's user only.
pub const PRIVATE_DIR_MODE: u32 = 0o700;
/// Mode of every file in the state directory.
pub const PRIVATE_FILE_MODE: u32 = 0o600;

/// The database, and the files SQLite keeps beside it (WAL mode's `-wal` and `-shm`; a
/// `-journal` only if the journal mode was ever changed back).
const DATABASE: &str = "sessions.sqlite3";
const DATABASE_SIDE_FILES: [&str; 3] = ["-wal", "-shm", "-journal"];

/// Creates `dir` (and missing parents) with mode 0700, or tightens an existing one that
/// group or others may enter, saying so in the log.
fn private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(dir)
        .with_context(|| format!("create the directory {}", dir.display()))?;
    // `mode` is filtered through the umask, and an existing directory keeps its own.
    tighten(dir, PRIVATE_DIR_MODE)
}

/// Sets `path` to `mode` if group or others have any access to it, saying so in the log: a
/// state directory made by an older tfsd, or by hand, is brought into line rather than
/// refused. A mode without group or other bits is left as the operator set it.
fn tighten(path: &Path, mode: u32) -> anyhow::Result<()> {
    let metadata = std::fs::metadata(path)
        .with_context(|| format!("read the permissions of {}", path.display()))?;
    let current = metadata.permissions().mode() & 0o7777;
    if current & 0o077 == 0 {
        return Ok(());
    }
    std::fs::set_permissions(path, Permissions::from_mode(mode)).with_context(|| {
        format!(
            "{} is open to group or others (mode {current:04o}) and could not be set to \
             {mode:04o}: run `chmod {mode:o} {}` as its owner",
            path.display(),
            path.display()
        )
    })?;
    tracing::warn!(
        path = %path.display(),
        was = %format!("{current:04o}"),
        now = %format!("{mode:04o}"),
        "a file or directory of the state directory was open to group or others: tightened"
    );
    Ok(())
}

/// Creates a new file only the daemon's user can read and write (0600, whatever the umask:
/// `mode` at creation is filtered through it, so it is set once more on the open file).
fn private_file(path: &Path) -> anyhow::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(PRIVATE_FILE_MODE)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    file.set_permissions(Permissions::from_mode(PRIVATE_FILE_MODE))
        .with_context(|| format!("set the permissions of {}", path.display()))?;
    Ok(file)
}

/// Makes sure the database file exists with mode 0600 before SQLite opens it: SQLite
/// creates a new database 0644 (less the umask), and its `-wal` and `-shm` files with the
/// database's own permissions.
fn private_database(path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        tighten(path, PRIVATE_FILE_MODE)
    } else {
        private_file(path).map(drop)
    }
}

/// Every file SQLite has beside the database, and every checkpoint file, 0600: a state
/// directory written by an older tfsd has them as the umask left them.
fn tighten_files(dir: &Path, checkpoints: &Path) -> anyhow::Result<()> {
    for suffix in DATABASE_SIDE_FILES {
        let path = dir.join(format!("{DATABASE}{suffix}"));
        if path.exists() {
            tighten(&path, PRIVATE_FILE_MODE)?;
        }
    }
    let entries = std::fs::read_dir(checkpoints)
        .with_context(|| format!("list {}", checkpoints.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("list {}", checkpoints.display()))?;
        if entry.file_type().is_ok_and(|kind| kind.is_file()) {
            tighten(&entry.path(), PRIVATE_FILE_MODE)?;
        }
    }
    Ok(())
}

fn gentle_name(action: Option<GentleAction>) -> Option<&'static str> {
    action.map(|action| match action {
        GentleAction::PurgeVariables => "purge_variables",
        GentleAction::ResetGraph => "reset_graph",
    })
}

impl SessionStore {
    /// Opens (creating if needed) the store in `dir`: the directories 0700, the files 0600.
    pub fn open(dir: &Path) -> anyhow::Result<SessionStore> {
        let checkpoints = dir.join("checkpoints");
        private_dir(dir)?;
        private_dir(&checkpoints)?;
        let path = dir.join(DATABASE);
        private_database(&path)?;
        let connection =
            Connection::open(&path).with_context(|| format!("open {}", path.display()))?;
        connection
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = FULL;
                 CREATE TABLE IF NOT EXISTS sessions (
                     id TEXT PRIMARY KEY,
                     owner TEXT NOT NULL,
                     labels TEXT NOT NULL,
                     config BLOB NOT NULL,
                     graph_def BLOB NOT NULL,
                     graph_version INTEGER NOT NULL,
                     soft_limit INTEGER,
                     hard_limit INTEGER,
                     gentle_action TEXT,
                     preserve_variables INTEGER NOT NULL,
                     durable_variables INTEGER NOT NULL,
                     created_at INTEGER NOT NULL,
                     checkpoint TEXT,
                     checkpoint_at INTEGER
                 );",
            )
            .with_context(|| format!("set up {}", path.display()))?;
        // The WAL mode above made SQLite create `-wal` and `-shm` (with the database's mode).
        tighten_files(dir, &checkpoints)?;
        Ok(SessionStore {
            connection: Mutex::new(connection),
            checkpoints,
        })
    }

    fn connection(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.connection.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn put(&self, record: &SessionRecord) -> anyhow::Result<()> {
        let labels = serde_json::to_string(&record.labels).context("encode labels")?;
        self.connection()
            .execute(
                "INSERT OR REPLACE INTO sessions (id, owner, labels, config, graph_def,
                     graph_version, soft_limit, hard_limit, gentle_action, preserve_variables,
                     durable_variables, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                params![
                    record.id,
                    record.owner,
                    labels,
                    record.config,
                    record.graph_def,
                    record.graph_version as i64,
                    record.policy.soft_limit_bytes.map(|b| b as i64),
                    record.policy.hard_limit_bytes.map(|b| b as i64),
                    gentle_name(record.policy.gentle_action),
                    record.policy.preserve_variables,
                    record.durable_variables,
                    seconds(record.created_at),
                ],
            )
            .with_context(|| format!("store session {}", record.id))?;
        Ok(())
    }

    /// The session's graph changed (extended, or reset to empty).
    pub fn set_graph(&self, id: &str, graph_def: &[u8], version: u64) -> anyhow::Result<()> {
        self.connection()
            .execute(
                "UPDATE sessions SET graph_def = ?2, graph_version = ?3 WHERE id = ?1",
                params![id, graph_def, version as i64],
            )
            .with_context(|| format!("store the graph of session {id}"))?;
        Ok(())
    }

    /// Forgets a closed session and its checkpoint.
    pub fn remove(&self, id: &str) -> anyhow::Result<()> {
        let checkpoint = self.checkpoint_name(id)?;
        self.connection()
            .execute("DELETE FROM sessions WHERE id = ?1", params![id])
            .with_context(|| format!("forget session {id}"))?;
        if let Some(name) = checkpoint {
            let _ = std::fs::remove_file(self.checkpoints.join(name));
        }
        Ok(())
    }

    pub fn all(&self) -> anyhow::Result<Vec<SessionRecord>> {
        let connection = self.connection();
        let mut statement = connection.prepare(
            "SELECT id, owner, labels, config, graph_def, graph_version, soft_limit, hard_limit,
                    gentle_action, preserve_variables, durable_variables, created_at
             FROM sessions ORDER BY created_at, id",
        )?;
        let rows = statement.query_map([], |row| {
            let labels: String = row.get(2)?;
            let gentle: Option<String> = row.get(8)?;
            Ok(SessionRecord {
                id: row.get(0)?,
                owner: row.get(1)?,
                labels: serde_json::from_str(&labels).unwrap_or_default(),
                config: row.get(3)?,
                graph_def: row.get(4)?,
                graph_version: row.get::<_, i64>(5)? as u64,
                policy: SessionPolicy {
                    soft_limit_bytes: row.get::<_, Option<i64>>(6)?.map(|b| b as u64),
                    hard_limit_bytes: row.get::<_, Option<i64>>(7)?.map(|b| b as u64),
                    gentle_action: match gentle.as_deref() {
                        Some("reset_graph") => Some(GentleAction::ResetGraph),
                        Some("purge_variables") => Some(GentleAction::PurgeVariables),
                        _ => None,
                    },
                    preserve_variables: row.get(9)?,
                    // Not stored: a restored session gets the configured GPU limits
                    // (`PolicyConfig::with_gpu_defaults`).
                    gpu_soft_limit_bytes: None,
                    gpu_hard_limit_bytes: None,
                },
                durable_variables: row.get(10)?,
                created_at: UNIX_EPOCH + Duration::from_secs(row.get::<_, i64>(11)?.max(0) as u64),
            })
        })?;
        rows.collect::<Result<Vec<_>, _>>()
            .context("read the stored sessions")
    }

    fn checkpoint_name(&self, id: &str) -> anyhow::Result<Option<String>> {
        let name: Option<Option<String>> = self
            .connection()
            .query_row(
                "SELECT checkpoint FROM sessions WHERE id = ?1",
                params![id],
                |row| row.get(0),
            )
            .optional()?;
        Ok(name.flatten())
    }

    /// Writes the session's variables as its current checkpoint, atomically: a crash at any
    /// point leaves either the previous checkpoint or this one, never a torn file.
    pub fn write_checkpoint(&self, id: &str, variables: &[NamedTensor]) -> anyhow::Result<()> {
        let previous = self.checkpoint_name(id)?;
        let name = format!("{id}-{}.pb", uuid::Uuid::new_v4().simple());
        let path = self.checkpoints.join(&name);
        let temporary = self.checkpoints.join(format!(".{name}.tmp"));
        let bytes = Variables {
            variables: variables.to_vec(),
        }
        .encode_to_vec();
        {
            let mut file = private_file(&temporary)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
        }
        std::fs::rename(&temporary, &path)?;
        File::open(&self.checkpoints)?.sync_all()?;
        self.connection()
            .execute(
                "UPDATE sessions SET checkpoint = ?2, checkpoint_at = ?3 WHERE id = ?1",
                params![id, name, seconds(SystemTime::now())],
            )
            .with_context(|| format!("record the checkpoint of session {id}"))?;
        if let Some(previous) = previous {
            let _ = std::fs::remove_file(self.checkpoints.join(previous));
        }
        Ok(())
    }

    /// Drops the checkpoint (the variables it holds no longer apply: purged, graph reset).
    pub fn drop_checkpoint(&self, id: &str) -> anyhow::Result<()> {
        let previous = self.checkpoint_name(id)?;
        self.connection().execute(
            "UPDATE sessions SET checkpoint = NULL, checkpoint_at = NULL WHERE id = ?1",
            params![id],
        )?;
        if let Some(previous) = previous {
            let _ = std::fs::remove_file(self.checkpoints.join(previous));
        }
        Ok(())
    }

    /// The session's last checkpoint, if any.
    pub fn read_checkpoint(&self, id: &str) -> anyhow::Result<Option<Vec<NamedTensor>>> {
        let Some(name) = self.checkpoint_name(id)? else {
            return Ok(None);
        };
        let path = self.checkpoints.join(name);
        let bytes = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
        let variables = Variables::decode(bytes.as_slice())
            .with_context(|| format!("decode {}", path.display()))?;
        Ok(Some(variables.variables))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::tensorflow::TensorProto;

    fn temp_dir() -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("tfsd-store-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    }

    fn record(id: &str) -> SessionRecord {
        SessionRecord {
            id: id.to_string(),
            owner: "alice".into(),
            labels: [("run".to_string(), "7".to_string())].into(),
            config: vec![1, 2],
            graph_def: vec![10, 20, 30],
            graph_version: 0,
            policy: SessionPolicy {
                soft_limit_bytes: Some(100),
                hard_limit_bytes: None,
                gentle_action: Some(GentleAction::ResetGraph),
                preserve_variables: true,
                gpu_soft_limit_bytes: None,
                gpu_hard_limit_bytes: None,
            },
            durable_variables: true,
            created_at: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        }
    }

    #[test]
    fn sessions_survive_reopening() {
        let dir = temp_dir();
        {
            let store = SessionStore::open(&dir).expect("open");
            store.put(&record("s-1")).expect("put");
            store.put(&record("s-2")).expect("put");
            store.set_graph("s-1", &[9, 9], 3).expect("graph");
            store.remove("s-2").expect("remove");
        }
        let store = SessionStore::open(&dir).expect("reopen");
        let all = store.all().expect("all");
        assert_eq!(all.len(), 1);
        let expected = SessionRecord {
            graph_def: vec![9, 9],
            graph_version: 3,
            ..record("s-1")
        };
        assert_eq!(all[0], expected);
    }

    /// Every path under `dir` with its permission bits.
    fn modes(dir: &Path) -> Vec<(PathBuf, u32)> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).expect("list") {
            let path = entry.expect("entry").path();
            let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o7777;
            found.push((path.clone(), mode));
            if path.is_dir() {
                found.extend(modes(&path));
            }
        }
        found
    }

    #[test]
    fn the_state_directory_is_the_daemons_alone() {
        let dir = temp_dir();
        // As an operator's `mkdir` under umask 022 leaves it, with a database file that
        // an older tfsd left readable to all.
        std::fs::set_permissions(&dir, Permissions::from_mode(0o755)).expect("chmod");
        let store = SessionStore::open(&dir).expect("open");
        store.put(&record("s-1")).expect("put");
        store.write_checkpoint("s-1", &[]).expect("checkpoint");
        drop(store);
        std::fs::set_permissions(dir.join(DATABASE), Permissions::from_mode(0o644)).expect("chmod");
        let store = SessionStore::open(&dir).expect("reopen");
        store.write_checkpoint("s-1", &[]).expect("checkpoint");

        let dir_mode = std::fs::metadata(&dir).expect("stat").permissions().mode() & 0o7777;
        assert_eq!(dir_mode, PRIVATE_DIR_MODE, "{}", dir.display());
        let found = modes(&dir);
        let names: Vec<String> = found
            .iter()
            .filter_map(|(path, _)| path.file_name())
            .map(|name| name.to_string_lossy().into_owned())
            .collect();
        for expected in [DATABASE, "sessions.sqlite3-wal", "sessions.sqlite3-shm"] {
            assert!(names.iter().any(|name| name == expected), "{names:?}");
        }
        assert!(names.iter().any(|name| name.ends_with(".pb")), "{names:?}");
        for (path, mode) in found {
            let expected = if path.is_dir() {
                PRIVATE_DIR_MODE
            } else {
                PRIVATE_FILE_MODE
            };
            assert_eq!(mode, expected, "{} is {mode:04o}", path.display());
        }
    }

    #[test]
    fn checkpoints_replace_each_other_atomically() {
        let dir = temp_dir();
        let store = SessionStore::open(&dir).expect("open");
        store.put(&record("s-1")).expect("put");
        assert_eq!(store.read_checkpoint("s-1").expect("read"), None);
        let variable = |value: f32| NamedTensor {
            name: "w".into(),
            tensor: Some(TensorProto {
                dtype: 1,
                float_val: vec![value],
                ..TensorProto::default()
            }),
        };
        store
            .write_checkpoint("s-1", &[variable(1.0)])
            .expect("write");
        store
            .write_checkpoint("s-1", &[variable(2.0)])
            .expect("write");
        let read = store.read_checkpoint("s-1").expect("read").expect("some");
        assert_eq!(read, vec![variable(2.0)]);
        // Only the current checkpoint file remains.
        let files = std::fs::read_dir(dir.join("checkpoints"))
            .expect("dir")
            .count();
        assert_eq!(files, 1);
        store.drop_checkpoint("s-1").expect("drop");
        assert_eq!(store.read_checkpoint("s-1").expect("read"), None);
        assert_eq!(
            std::fs::read_dir(dir.join("checkpoints"))
                .expect("dir")
                .count(),
            0
        );
    }
}
