//! A node's volume: the backing store, its metadata area, and the role that
//! decides whether this node may serve I/O.

use std::fs::File;
use std::sync::{Arc, Mutex};

use blkmirror_config::NodeConfig;
use blkmirror_io::{AlignedBuf, Engine, Store};
use blkmirror_metadata::{self as metadata, fresh_generation, Flags, Generations, Superblock};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::tracking::ChangeTracker;
use crate::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Primary,
    Secondary,
}

/// The state of this node's data, named as DRBD operators know them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskState {
    /// Mid-sync or never initialised: the data must not be used.
    Inconsistent,
    /// Consistent, but known to be older than the peer's.
    Outdated,
    /// Consistent, and as new as anything this node knows of.
    UpToDate,
}

impl DiskState {
    pub fn from_flags(flags: Flags) -> DiskState {
        if !flags.contains(Flags::CONSISTENT) {
            DiskState::Inconsistent
        } else if flags.contains(Flags::UP_TO_DATE) {
            DiskState::UpToDate
        } else {
            DiskState::Outdated
        }
    }
}

/// What `status` reports about the volume.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub resource: String,
    pub node: String,
    pub role: Role,
    pub disk_state: DiskState,
    pub disk: String,
    pub data_size: u64,
    pub volume_uuid: Uuid,
    pub generations: GenerationsView,
    pub flags: Vec<String>,
    pub nbd_clients: usize,
    /// Bytes the peer lacks (marked in the dirty bitmap).
    pub out_of_sync_bytes: u64,
    pub io_engine: String,
    pub direct_io: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenerationsView {
    pub current: String,
    pub bitmap: String,
    pub history: Vec<String>,
}

impl From<&Generations> for GenerationsView {
    fn from(g: &Generations) -> GenerationsView {
        let hex = |v: u64| format!("{v:016X}");
        GenerationsView {
            current: hex(g.current),
            bitmap: hex(g.bitmap),
            history: g.history.iter().map(|&h| hex(h)).collect(),
        }
    }
}

pub fn flag_names(flags: Flags) -> Vec<String> {
    flags
        .iter_names()
        .map(|(name, _)| name.to_lowercase())
        .collect()
}

struct State {
    role: Role,
    superblock: Superblock,
    /// Frontend clients attached; changes only together with the role check.
    clients: usize,
}

pub struct Volume {
    resource: String,
    node: String,
    disk: String,
    store: Store,
    /// The metadata area is read and written through the buffered descriptor.
    meta: File,
    data_offset: u64,
    data_size: u64,
    state: Mutex<State>,
    tracker: ChangeTracker,
}

impl Volume {
    /// Opens the node's disk (locking it) and checks its metadata. Nothing is
    /// written until [`Volume::start`]; the node starts as Secondary.
    pub fn open(resource: &str, node: &NodeConfig) -> Result<Arc<Volume>, Error> {
        let store = Store::open(&node.disk, Engine::Uring)?;
        let meta = store
            .file()
            .buffered
            .try_clone()
            .map_err(|source| Error::Disk {
                disk: node.disk.display().to_string(),
                source: metadata::Error::Io {
                    what: "duplicating the disk descriptor",
                    source,
                },
            })?;
        let disk = node.disk.display().to_string();
        let loaded = metadata::open(&meta, store.file().size).map_err(|source| Error::Disk {
            disk: disk.clone(),
            source,
        })?;
        if let Some(damage) = &loaded.other_slot_damage {
            tracing::warn!(disk, %damage, "one superblock slot is damaged (torn write?); using the other, the next metadata write repairs it");
        }
        let superblock = loaded.superblock;
        if superblock.node_name != node.name {
            return Err(Error::WrongDisk {
                disk,
                found: superblock.node_name,
                expected: node.name.clone(),
            });
        }
        let layout = superblock.layout;
        let tracker = ChangeTracker::open(&meta, &layout, &disk)?;
        tracing::info!(
            disk,
            data_offset = layout.data_offset,
            data_size = layout.data_size,
            io_engine = ?store.engine(),
            direct_io = store.file().uses_direct_io(),
            "volume opened"
        );
        Ok(Arc::new(Volume {
            resource: resource.to_string(),
            node: node.name.clone(),
            disk,
            store,
            meta,
            data_offset: layout.data_offset,
            data_size: layout.data_size,
            state: Mutex::new(State {
                role: Role::Secondary,
                superblock,
                clients: 0,
            }),
            tracker,
        }))
    }

    /// Records that the node is running: a crash from here on is detectable
    /// because the clean-shutdown flag is gone.
    pub async fn start(&self) -> Result<(), Error> {
        let crashed = !self
            .state
            .lock()
            .unwrap()
            .superblock
            .flags
            .contains(Flags::CLEAN_SHUTDOWN);
        if crashed {
            self.tracker.recover_after_crash(&self.store).await?;
        }
        let mut state = self.state.lock().unwrap();
        self.persist(&mut state, |sb| {
            // Coming up after being primary without a clean shutdown is a crash.
            if sb.flags.contains(Flags::PRIMARY) && !sb.flags.contains(Flags::CLEAN_SHUTDOWN) {
                tracing::warn!(
                    disk = self.disk,
                    "this node was primary and did not shut down cleanly"
                );
                sb.flags.insert(Flags::CRASHED_PRIMARY);
            }
            sb.flags.remove(Flags::CLEAN_SHUTDOWN | Flags::PRIMARY);
        })
    }

    pub fn resource(&self) -> &str {
        &self.resource
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn data_size(&self) -> u64 {
        self.data_size
    }

    pub fn role(&self) -> Role {
        self.state.lock().unwrap().role
    }

    /// Writes a changed copy of the superblock, and adopts it only once it
    /// is on disk: memory never claims a state the disk does not hold.
    fn persist(
        &self,
        state: &mut State,
        change: impl FnOnce(&mut Superblock),
    ) -> Result<(), Error> {
        let mut sb = state.superblock.clone();
        change(&mut sb);
        metadata::store(&self.meta, &mut sb).map_err(|source| Error::Disk {
            disk: self.disk.clone(),
            source,
        })?;
        state.superblock = sb;
        Ok(())
    }

    /// Makes this node primary. Data that is not UpToDate is only promoted
    /// with `force`, which declares it valid and starts a new generation.
    pub fn promote(&self, force: bool) -> Result<(), Error> {
        let mut state = self.state.lock().unwrap();
        if state.role == Role::Primary {
            return Ok(());
        }
        let disk_state = DiskState::from_flags(state.superblock.flags);
        if disk_state != DiskState::UpToDate && !force {
            return Err(Error::NotUpToDate { disk_state });
        }
        self.persist(&mut state, |sb| {
            if disk_state != DiskState::UpToDate {
                tracing::warn!(
                    ?disk_state,
                    "forced promotion: declaring this node's data valid"
                );
                sb.flags.insert(Flags::CONSISTENT | Flags::UP_TO_DATE);
                sb.generations.start_new(fresh_generation());
            } else if sb.generations.is_just_created() {
                sb.generations.start_new(fresh_generation());
            }
            sb.flags.insert(Flags::PRIMARY);
            sb.flags.remove(Flags::CRASHED_PRIMARY);
        })?;
        state.role = Role::Primary;
        tracing::info!("promoted to Primary");
        Ok(())
    }

    /// Makes this node secondary: refused while clients are attached, as a
    /// mounted device cannot be demoted under its users.
    pub async fn demote(&self) -> Result<(), Error> {
        {
            // Checked and switched in one step, so no client attaches between.
            let mut state = self.state.lock().unwrap();
            if state.role == Role::Secondary {
                return Ok(());
            }
            if state.clients > 0 {
                return Err(Error::ClientsAttached(state.clients));
            }
            state.role = Role::Secondary;
        }
        self.store.flush().await?;
        let mut state = self.state.lock().unwrap();
        self.persist(&mut state, |sb| sb.flags.remove(Flags::PRIMARY))?;
        tracing::info!("demoted to Secondary");
        Ok(())
    }

    /// Flushes the data and records a clean shutdown.
    pub async fn shutdown(&self) -> Result<(), Error> {
        self.tracker.flush(&self.store).await?;
        self.store.flush().await?;
        let mut state = self.state.lock().unwrap();
        state.role = Role::Secondary;
        self.persist(&mut state, |sb| {
            sb.flags.remove(Flags::PRIMARY);
            sb.flags.insert(Flags::CLEAN_SHUTDOWN);
        })?;
        Ok(())
    }

    pub fn status(&self) -> VolumeStatus {
        let state = self.state.lock().unwrap();
        let sb = &state.superblock;
        VolumeStatus {
            resource: self.resource.clone(),
            node: self.node.clone(),
            role: state.role,
            disk_state: DiskState::from_flags(sb.flags),
            disk: self.disk.clone(),
            data_size: self.data_size,
            volume_uuid: sb.volume_uuid,
            generations: (&sb.generations).into(),
            flags: flag_names(sb.flags),
            nbd_clients: state.clients,
            out_of_sync_bytes: self.tracker.out_of_sync_bytes(),
            io_engine: self.store.engine().name().to_string(),
            direct_io: self.store.file().uses_direct_io(),
        }
    }

    /// Attaches a frontend client if this node serves I/O (is primary).
    pub fn attach(&self) -> Result<(), Error> {
        let mut state = self.state.lock().unwrap();
        if state.role != Role::Primary {
            return Err(self.not_serving());
        }
        state.clients += 1;
        Ok(())
    }

    pub fn detach(&self) {
        let mut state = self.state.lock().unwrap();
        state.clients = state.clients.saturating_sub(1);
    }

    /// Why a client is refused while this node is not primary.
    pub fn not_serving(&self) -> Error {
        Error::NotServing {
            resource: self.resource.clone(),
            node: self.node.clone(),
        }
    }

    /// Checks that I/O may be served and maps a data-area range to the disk.
    fn disk_offset(&self, offset: u64, len: u64) -> Result<u64, Error> {
        if self.role() != Role::Primary {
            return Err(Error::NotPrimary);
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.data_size => Ok(self.data_offset + offset),
            _ => Err(Error::OutOfRange {
                offset,
                len,
                size: self.data_size,
            }),
        }
    }

    pub async fn read(&self, offset: u64, len: usize) -> Result<AlignedBuf, Error> {
        let at = self.disk_offset(offset, len as u64)?;
        Ok(self.store.read(at, len).await?)
    }

    pub async fn write(&self, offset: u64, data: AlignedBuf, fua: bool) -> Result<(), Error> {
        let at = self.disk_offset(offset, data.len() as u64)?;
        // No peer is connected yet: every write is one it lacks.
        self.tracker
            .before_write(&self.store, offset, data.len() as u64, true)
            .await?;
        self.store.write(at, data, fua).await?;
        Ok(())
    }

    pub async fn flush(&self) -> Result<(), Error> {
        if self.role() != Role::Primary {
            return Err(Error::NotPrimary);
        }
        Ok(self.store.flush().await?)
    }

    /// Zeroes a range (TRIM and WRITE_ZEROES): both read back as zeroes, so
    /// replicas stay byte-identical whatever the device does with discards.
    pub async fn zero(&self, offset: u64, len: u64, unmap: bool, fua: bool) -> Result<(), Error> {
        let at = self.disk_offset(offset, len)?;
        self.tracker
            .before_write(&self.store, offset, len, true)
            .await?;
        self.store.zero_range(at, len, unmap).await?;
        if fua {
            self.store.flush().await?;
        }
        Ok(())
    }
}
