//! [`DiskStorage`]: raft-rs [`Storage`] kept in memory and made durable in a data directory.
//!
//! - `raft.log`: appended entries, one checksummed frame each, fsynced before the messages
//!   that depend on them are sent. Replaying the frames in order rebuilds the log (a frame
//!   whose index is at or below the last one truncates the tail, as an append does); a torn
//!   frame at the end, from a crash mid-write, is dropped.
//! - `hardstate`: term, vote and commit, replaced atomically (write, fsync, rename).
//! - `snapshot`: the last snapshot (metadata with the conf state, and the state machine) with
//!   the hard state, in one atomically replaced file, so a restart never sees a snapshot newer
//!   than its commit index. Taking a snapshot compacts the log: `raft.log` is rewritten with
//!   the entries after it.
//!
//! Without a directory (tests' in-memory networks) nothing is written.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

use crate::error::CoordinatorError;

const LOG: &str = "raft.log";
const HARD_STATE: &str = "hardstate";
const SNAPSHOT: &str = "snapshot";

pub struct DiskStorage {
    dir: Option<PathBuf>,
    log: Option<File>,
    hard_state: HardState,
    conf_state: ConfState,
    /// The last snapshot taken or received (index 0: none; its conf state is the initial one).
    snapshot: Snapshot,
    /// Entries after the snapshot, contiguous.
    entries: Vec<Entry>,
}

impl DiskStorage {
    /// Storage that lives in memory only.
    pub fn in_memory(voters: &[u64]) -> Self {
        let mut s = DiskStorage {
            dir: None,
            log: None,
            hard_state: HardState::default(),
            conf_state: ConfState::default(),
            snapshot: Snapshot::default(),
            entries: Vec::new(),
        };
        s.conf_state.voters = voters.to_vec();
        s.snapshot.mut_metadata().set_conf_state(s.conf_state.clone());
        s
    }

    /// Opens the storage in `dir`, creating it with `voters` as the first configuration if it
    /// holds none (a new member joining an existing group passes no voters and learns them
    /// from the leader's snapshot). Returns whether state was found on disk.
    pub fn open(dir: &Path, voters: &[u64]) -> Result<(Self, bool), CoordinatorError> {
        let io = |source| CoordinatorError::Storage { path: dir.to_path_buf(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut s = DiskStorage::in_memory(voters);
        s.dir = Some(dir.to_path_buf());
        let mut found = false;
        if let Some(frames) = read_frames(&dir.join(SNAPSHOT))? {
            let [snap, hs] = frames.as_slice() else {
                return Err(corrupt(&dir.join(SNAPSHOT), "expected a snapshot and a hard state"));
            };
            s.snapshot = parse(&dir.join(SNAPSHOT), snap)?;
            s.hard_state = parse(&dir.join(SNAPSHOT), hs)?;
            s.conf_state = s.snapshot.get_metadata().get_conf_state().clone();
            found = true;
        }
        if let Some(frames) = read_frames(&dir.join(HARD_STATE))? {
            let hs: HardState = parse(&dir.join(HARD_STATE), frames.first().map_or(&[][..], |f| f))?;
            // The snapshot file carries a hard state too; the newer (higher term, then commit) wins.
            if (hs.term, hs.commit) >= (s.hard_state.term, s.hard_state.commit) {
                s.hard_state = hs;
            }
            found = true;
        }
        let log_path = dir.join(LOG);
        let (frames, valid_len) = read_log(&log_path)?;
        for frame in frames {
            let entry: Entry = parse(&log_path, &frame)?;
            if entry.index <= s.snapshot.get_metadata().index {
                // A rewrite that went back below the snapshot: what followed it is gone too.
                s.entries.clear();
                continue;
            }
            s.append_in_memory(std::slice::from_ref(&entry))?;
            found = true;
        }
        // Drop a torn tail so new frames follow the last whole one.
        let log = OpenOptions::new().create(true).append(true).open(&log_path).map_err(io)?;
        log.set_len(valid_len).map_err(io)?;
        s.log = Some(log);
        if !found && !voters.is_empty() {
            s.write_snapshot()?;
        }
        Ok((s, found))
    }

    /// Gives the initial snapshot (index 0: the first configuration) its state machine image.
    pub fn set_initial_state(&mut self, data: Vec<u8>) -> Result<(), CoordinatorError> {
        if self.snapshot_index() != 0 {
            return Ok(());
        }
        self.snapshot.data = data.into();
        self.write_snapshot()
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    pub fn snapshot_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }

    /// The state machine image of the last snapshot (empty: none).
    pub fn snapshot_data(&self) -> &[u8] {
        &self.snapshot.data
    }

    /// Appends `entries` (replacing any conflicting tail) and fsyncs them.
    pub fn append(&mut self, entries: &[Entry]) -> Result<(), CoordinatorError> {
        if entries.is_empty() {
            return Ok(());
        }
        self.append_in_memory(entries)?;
        if let (Some(dir), Some(log)) = (&self.dir, &mut self.log) {
            let mut buf = Vec::new();
            for e in entries {
                frame(&mut buf, &e.write_to_bytes().expect("entries encode"));
            }
            let path = dir.join(LOG);
            log.write_all(&buf)
                .and_then(|_| log.sync_data())
                .map_err(|source| CoordinatorError::Storage { path, source })?;
        }
        Ok(())
    }

    fn append_in_memory(&mut self, entries: &[Entry]) -> Result<(), CoordinatorError> {
        let first = entries[0].index;
        if first <= self.snapshot_index() {
            return Err(CoordinatorError::Rejected(format!(
                "append at index {first} overwrites the snapshot at {}",
                self.snapshot_index()
            )));
        }
        if first > self.last() + 1 {
            return Err(CoordinatorError::Rejected(format!(
                "append at index {first} leaves a gap after {}",
                self.last()
            )));
        }
        self.entries.truncate((first - self.first()) as usize);
        self.entries.extend_from_slice(entries);
        Ok(())
    }

    /// Replaces the hard state, durably.
    pub fn set_hard_state(&mut self, hs: HardState) -> Result<(), CoordinatorError> {
        if hs == self.hard_state {
            return Ok(());
        }
        self.hard_state = hs;
        if let Some(dir) = &self.dir {
            let mut buf = Vec::new();
            frame(&mut buf, &self.hard_state.write_to_bytes().expect("hard state encodes"));
            replace(&dir.join(HARD_STATE), &buf)?;
        }
        Ok(())
    }

    pub fn set_commit(&mut self, commit: u64) -> Result<(), CoordinatorError> {
        let mut hs = self.hard_state.clone();
        hs.commit = commit;
        self.set_hard_state(hs)
    }

    /// The conf state after applying a conf change (made durable by the next snapshot; until
    /// then a restart re-applies the change from the log).
    pub fn set_conf_state(&mut self, cs: ConfState) {
        self.conf_state = cs;
    }

    /// Installs a snapshot received from the leader: the log restarts after it.
    pub fn apply_snapshot(&mut self, snapshot: Snapshot) -> Result<(), CoordinatorError> {
        let meta = snapshot.get_metadata();
        if meta.index <= self.snapshot_index() {
            return Ok(());
        }
        self.hard_state.term = self.hard_state.term.max(meta.term);
        self.hard_state.commit = self.hard_state.commit.max(meta.index);
        self.conf_state = meta.get_conf_state().clone();
        // The leader sends what follows; a local tail may have diverged from it.
        self.entries.clear();
        self.snapshot = snapshot;
        self.write_snapshot()?;
        self.rewrite_log()
    }

    /// Takes a snapshot at `applied` (its term looked up in the log) with the state machine
    /// image `data`, then compacts the log up to it.
    pub fn compact(&mut self, applied: u64, data: Vec<u8>) -> Result<(), CoordinatorError> {
        if applied <= self.snapshot_index() {
            return Ok(());
        }
        let term = self.term(applied)?;
        let mut snapshot = Snapshot { data: data.into(), ..Default::default() };
        let meta = snapshot.mut_metadata();
        meta.index = applied;
        meta.term = term;
        meta.set_conf_state(self.conf_state.clone());
        self.snapshot = snapshot;
        self.entries.retain(|e| e.index > applied);
        self.write_snapshot()?;
        self.rewrite_log()
    }

    fn write_snapshot(&self) -> Result<(), CoordinatorError> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let mut hs = self.hard_state.clone();
        hs.commit = hs.commit.max(self.snapshot_index());
        let mut buf = Vec::new();
        frame(&mut buf, &self.snapshot.write_to_bytes().expect("snapshots encode"));
        frame(&mut buf, &hs.write_to_bytes().expect("hard state encodes"));
        replace(&dir.join(SNAPSHOT), &buf)
    }

    fn rewrite_log(&mut self) -> Result<(), CoordinatorError> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let mut buf = Vec::new();
        for e in &self.entries {
            frame(&mut buf, &e.write_to_bytes().expect("entries encode"));
        }
        let path = dir.join(LOG);
        replace(&path, &buf)?;
        let log =
            OpenOptions::new().append(true).open(&path).map_err(|source| CoordinatorError::Storage { path, source })?;
        self.log = Some(log);
        Ok(())
    }

    fn first(&self) -> u64 {
        self.snapshot_index() + 1
    }

    fn last(&self) -> u64 {
        self.entries.last().map_or(self.snapshot_index(), |e| e.index)
    }
}

impl Storage for DiskStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(self.hard_state.clone(), self.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let offset = self.first();
        let mut out = self.entries[(low - offset) as usize..(high - offset) as usize].to_vec();
        if let Some(max) = max_size.into() {
            // At least one entry, then as many as fit.
            let mut size = 0u64;
            let keep = out
                .iter()
                .take_while(|e| {
                    size += u64::from(e.compute_size());
                    size <= max
                })
                .count()
                .max(1);
            out.truncate(keep);
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let meta = self.snapshot.get_metadata();
        if idx == meta.index {
            return Ok(meta.term);
        }
        if idx < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.entries[(idx - self.first()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        // Snapshots are taken as the log is compacted; the last one is what a lagging follower
        // needs (everything before it is gone from the log).
        Ok(self.snapshot.clone())
    }
}

/// FNV-1a, enough to tell a torn or corrupted frame from a whole one.
fn checksum(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, &b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

fn frame(buf: &mut Vec<u8>, payload: &[u8]) {
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&checksum(payload).to_le_bytes());
    buf.extend_from_slice(payload);
}

/// The whole frames of `bytes`, and how many bytes they span.
fn split_frames(bytes: &[u8]) -> (Vec<Vec<u8>>, usize) {
    let mut frames = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= 8 {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let sum = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes"));
        let Some(payload) = bytes.get(at + 8..at + 8 + len) else { break };
        if checksum(payload) != sum {
            break;
        }
        frames.push(payload.to_vec());
        at += 8 + len;
    }
    (frames, at)
}

fn read_all(path: &Path) -> Result<Option<Vec<u8>>, CoordinatorError> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut bytes).map_err(|source| CoordinatorError::Storage { path: path.into(), source })?;
            Ok(Some(bytes))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CoordinatorError::Storage { path: path.into(), source }),
    }
}

/// A file written whole by [`replace`]: every frame must be intact.
fn read_frames(path: &Path) -> Result<Option<Vec<Vec<u8>>>, CoordinatorError> {
    let Some(bytes) = read_all(path)? else { return Ok(None) };
    let (frames, len) = split_frames(&bytes);
    if len != bytes.len() {
        return Err(corrupt(path, &format!("a damaged frame at byte {len} of {}", bytes.len())));
    }
    Ok(Some(frames))
}

/// The append-only log: a damaged tail is a write the crash interrupted, and is dropped.
fn read_log(path: &Path) -> Result<(Vec<Vec<u8>>, u64), CoordinatorError> {
    let Some(bytes) = read_all(path)? else { return Ok((Vec::new(), 0)) };
    let (frames, len) = split_frames(&bytes);
    if len != bytes.len() {
        tracing::warn!(path = %path.display(), kept = len, size = bytes.len(), "dropping a torn raft log tail");
    }
    Ok((frames, len as u64))
}

fn parse<M: protobuf::Message>(path: &Path, bytes: &[u8]) -> Result<M, CoordinatorError> {
    M::parse_from_bytes(bytes).map_err(|e| corrupt(path, &e.to_string()))
}

fn corrupt(path: &Path, reason: &str) -> CoordinatorError {
    CoordinatorError::Corrupt { path: path.to_path_buf(), reason: reason.to_string() }
}

/// Writes `bytes` to `path` atomically: a temporary file, fsync, rename, fsync the directory.
fn replace(path: &Path, bytes: &[u8]) -> Result<(), CoordinatorError> {
    let io = |source| CoordinatorError::Storage { path: path.to_path_buf(), source };
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io)?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64, data: &str) -> Entry {
        Entry { index, term, data: data.as_bytes().to_vec().into(), ..Default::default() }
    }

    #[test]
    fn log_hard_state_and_snapshot_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, found) = DiskStorage::open(dir.path(), &[1, 2, 3]).unwrap();
        assert!(!found);
        s.append(&[entry(1, 1, "a"), entry(2, 1, "b"), entry(3, 1, "c")]).unwrap();
        // A new leader overwrites the tail.
        s.append(&[entry(3, 2, "c2"), entry(4, 2, "d")]).unwrap();
        let hs = HardState { term: 2, vote: 1, commit: 3, ..Default::default() };
        s.set_hard_state(hs.clone()).unwrap();
        drop(s);

        let (mut s, found) = DiskStorage::open(dir.path(), &[1, 2, 3]).unwrap();
        assert!(found);
        assert_eq!(s.hard_state(), &hs);
        assert_eq!(s.conf_state().voters, vec![1, 2, 3]);
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (1, 4));
        assert_eq!(s.term(3).unwrap(), 2);
        let got = s.entries(1, 5, None, GetEntriesContext::empty(false)).unwrap();
        assert_eq!(
            got.iter().map(|e| e.data.to_vec()).collect::<Vec<_>>(),
            vec![b"a".to_vec(), b"b".to_vec(), b"c2".to_vec(), b"d".to_vec()]
        );

        s.compact(3, b"state at 3".to_vec()).unwrap();
        s.append(&[entry(5, 2, "e")]).unwrap();
        drop(s);
        let (s, _) = DiskStorage::open(dir.path(), &[]).unwrap();
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (4, 5));
        assert_eq!(s.snapshot_data(), b"state at 3");
        assert_eq!(s.conf_state().voters, vec![1, 2, 3]);
        assert!(matches!(
            s.entries(2, 4, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
    }

    #[test]
    fn a_crash_between_snapshot_and_log_rewrite_does_not_revive_overwritten_entries() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = DiskStorage::open(dir.path(), &[1]).unwrap();
        s.append(&(1..=10).map(|i| entry(i, 1, "old")).collect::<Vec<_>>()).unwrap();
        s.append(&[entry(5, 2, "new"), entry(6, 2, "new")]).unwrap();
        // The snapshot at 6 is written; the crash comes before the log is rewritten.
        s.snapshot = {
            let mut snap = Snapshot::default();
            snap.mut_metadata().index = 6;
            snap.mut_metadata().term = 2;
            snap.mut_metadata().set_conf_state(s.conf_state.clone());
            snap
        };
        s.write_snapshot().unwrap();
        drop(s);
        let (s, _) = DiskStorage::open(dir.path(), &[1]).unwrap();
        assert_eq!(s.last_index().unwrap(), 6, "entries 7..10 of term 1 were overwritten at 5 and must stay gone");
    }

    #[test]
    fn a_torn_log_tail_is_dropped_and_a_damaged_snapshot_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = DiskStorage::open(dir.path(), &[1]).unwrap();
        s.append(&[entry(1, 1, "a"), entry(2, 1, "b")]).unwrap();
        drop(s);
        let log = dir.path().join(LOG);
        let len = std::fs::metadata(&log).unwrap().len();
        OpenOptions::new().write(true).open(&log).unwrap().set_len(len - 1).unwrap();
        let (mut s, _) = DiskStorage::open(dir.path(), &[1]).unwrap();
        assert_eq!(s.last_index().unwrap(), 1);
        s.append(&[entry(2, 1, "b again")]).unwrap();
        drop(s);
        let (s, _) = DiskStorage::open(dir.path(), &[1]).unwrap();
        assert_eq!(
            s.entries(2, 3, None, GetEntriesContext::empty(false)).unwrap()[0].data.to_vec(),
            b"b again".to_vec()
        );

        let snap = dir.path().join(SNAPSHOT);
        let mut bytes = std::fs::read(&snap).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&snap, bytes).unwrap();
        let err = DiskStorage::open(dir.path(), &[1]).err().expect("a damaged snapshot is refused");
        assert!(err.to_string().contains("is corrupt"), "{err}");
    }
}
