//! Load pages: one process publishes how busy it is (and, less often, its
//! call counters), any number of others read it, and none of them can
//! write it.
//!
//! A replica creates its page ([`LoadPage::create`]): a one-page `memfd`,
//! mapped writable by the replica, then sealed with `F_SEAL_FUTURE_WRITE`
//! (and against resizing and further sealing), so that every later mapping,
//! by anyone who receives the fd, can only be read-only. The host daemon
//! checks those seals and hands the fd to clients, which map it with
//! [`LoadView::open`] and pick a replica by what it says, without asking
//! anyone.
//!
//! ```text
//! word  0  magic "SHMLOAD2"
//!       1  sequence: bumped by every publish
//!       2  calls in flight
//!       3  live connections
//!       4  CLOCK_MONOTONIC of the publish, in ns (shared by all processes)
//!   8 ..   the report: bytes under a sequence lock (`seqlock`), up to
//!          [`REPORT_CAPACITY`]; a replica's counters, encoded by the layer
//!          above
//! ```
//!
//! The words are read and written as 64-bit atomics (a read-only mapping
//! only ever sees loads); a reader copies each once and trusts nothing but
//! the magic: the numbers are hints for load balancing, never sizes or
//! offsets. The report is copied out whole ([`LoadView::read_report`]) with
//! its length checked against the region; its bytes are for the caller to
//! validate.
//!
//! ```
//! use shmesh_shm::load::{Load, LoadPage, LoadView};
//!
//! let page = LoadPage::create().unwrap();
//! page.publish(Load { in_flight: 3, connections: 2 });
//! let view = LoadView::open(page.fd().try_clone_to_owned().unwrap()).unwrap();
//! let seen = view.read();
//! assert_eq!((seen.load.in_flight, seen.load.connections), (3, 2));
//! ```

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rustix::fs::{
    MemfdFlags, SealFlags, fcntl_add_seals, fcntl_get_seals, fstat, ftruncate, memfd_create,
};
use rustix::mm::{MapFlags, ProtFlags, mmap, munmap};
use thiserror::Error;

use crate::seqlock::{self, SeqReadError, TooLarge};

/// The file's (and the mapping's) size: the load words, then the report.
const PAGE_LEN: usize = 64 << 10;
/// Its first word.
const MAGIC: u64 = u64::from_le_bytes(*b"SHMLOAD2");
/// Words in the page.
const WORDS: usize = PAGE_LEN / 8;
/// The first word of the report region.
const WORD_REPORT: usize = 8;

/// The most report bytes a page holds.
pub const REPORT_CAPACITY: usize = (WORDS - WORD_REPORT - crate::seqlock::HEADER_WORDS) * 8;

const WORD_MAGIC: usize = 0;
const WORD_SEQUENCE: usize = 1;
const WORD_IN_FLIGHT: usize = 2;
const WORD_CONNECTIONS: usize = 3;
const WORD_PUBLISHED: usize = 4;

/// The seals a reader requires: nobody may map it writable again, nor
/// resize it.
fn reader_seals() -> SealFlags {
    SealFlags::FUTURE_WRITE | SealFlags::SHRINK | SealFlags::GROW
}

/// How busy a process is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    /// Calls accepted and not yet answered.
    pub in_flight: u64,
    /// Live connections.
    pub connections: u64,
}

/// A [`Load`] as read, with when it was published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    /// The figures.
    pub load: Load,
    /// How many times the page was published.
    pub sequence: u64,
    /// How long ago it was last published (zero if the clock says the
    /// future).
    pub age: Duration,
}

/// A load page could not be made or opened.
#[derive(Debug, Error)]
pub enum LoadError {
    /// A system call failed.
    #[error("cannot {step} a load page: {source}")]
    System {
        /// What was being done.
        step: &'static str,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The fd lacks seals a reader relies on.
    #[error(
        "load page is missing seals {missing:?}: its creator could write or resize it through a new mapping"
    )]
    MissingSeals {
        /// The seals not present.
        missing: SealFlags,
    },
    /// The file is smaller than a page.
    #[error("load page is {len} bytes; {PAGE_LEN} expected")]
    TooSmall {
        /// Its length.
        len: u64,
    },
    /// The first word is not the magic.
    #[error("not a load page (magic {found:#018x})")]
    BadMagic {
        /// What was found.
        found: u64,
    },
}

fn sys(step: &'static str) -> impl Fn(rustix::io::Errno) -> LoadError {
    move |e| LoadError::System {
        step,
        source: e.into(),
    }
}

/// One mapped page, unmapped on drop.
#[derive(Debug)]
struct Page {
    ptr: NonNull<u8>,
}

// SAFETY: the page is only accessed through atomics; the pointer is valid
// from any thread for the life of the `Page`.
unsafe impl Send for Page {}
// SAFETY: as above.
unsafe impl Sync for Page {}

impl Page {
    fn map(fd: &OwnedFd, prot: ProtFlags) -> Result<Page, LoadError> {
        // SAFETY: a fresh shared mapping of one page of `fd` at an address the
        // kernel picks; it aliases no Rust object. The file is at least a
        // page long (checked or set by the callers) and sealed against
        // shrinking before any reader maps it, so the page stays backed.
        let ptr = unsafe {
            mmap(
                std::ptr::null_mut(),
                PAGE_LEN,
                prot,
                MapFlags::SHARED,
                fd,
                0,
            )
        }
        .map_err(sys("map"))?;
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(LoadError::System {
            step: "map",
            source: std::io::Error::other("mmap returned null"),
        })?;
        Ok(Page { ptr })
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        debug_assert!(i < WORD_REPORT);
        let i = i.min(WORD_REPORT - 1);
        // SAFETY: `i < WORD_REPORT < WORDS`, so the word is inside the page; the page is
        // page-aligned, so the word is 8-byte aligned; `AtomicU64` has the
        // layout of `u64` and every bit pattern is valid. The memory is only
        // ever accessed atomically, by every process that maps it; in a
        // read-only mapping only loads are issued.
        unsafe { &*self.ptr.as_ptr().add(i * 8).cast::<AtomicU64>() }
    }

    /// The report region's words.
    fn report(&self) -> &[AtomicU64] {
        // SAFETY: words `WORD_REPORT..WORDS` lie inside the mapping of
        // `PAGE_LEN` bytes, which is page-aligned (so 8-byte aligned);
        // `AtomicU64` has the layout of `u64`, every bit pattern is valid,
        // and the memory is only ever accessed atomically by every process
        // that maps it (loads only, through a read-only mapping). The slice
        // borrows `self`, which keeps the mapping alive.
        unsafe {
            std::slice::from_raw_parts(
                self.ptr.as_ptr().add(WORD_REPORT * 8).cast::<AtomicU64>(),
                WORDS - WORD_REPORT,
            )
        }
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        // SAFETY: `ptr` and `PAGE_LEN` are what mmap returned; every
        // reference into the page borrows the `Page`.
        let _ = unsafe { munmap(self.ptr.as_ptr().cast(), PAGE_LEN) };
    }
}

/// The monotonic clock, in ns (`CLOCK_MONOTONIC` is one clock for every
/// process on the host).
fn now_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    u64::try_from(t.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(t.tv_nsec).unwrap_or(0))
}

/// The writable side of a load page: its creator's.
#[derive(Debug)]
pub struct LoadPage {
    fd: OwnedFd,
    page: Page,
    /// One report writer at a time (the sequence lock's rule).
    report_writer: Mutex<()>,
}

impl LoadPage {
    /// Creates a page, maps it writable, and seals it so that every other
    /// mapping can only read.
    pub fn create() -> Result<LoadPage, LoadError> {
        let fd = memfd_create(
            "shmesh:load",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .map_err(sys("create"))?;
        ftruncate(&fd, PAGE_LEN as u64).map_err(sys("size"))?;
        let page = Page::map(&fd, ProtFlags::READ | ProtFlags::WRITE)?;
        // Relaxed: nobody else has the fd yet; passing it over a socket
        // orders this store before any reader's loads.
        page.word(WORD_MAGIC).store(MAGIC, Ordering::Relaxed);
        fcntl_add_seals(&fd, reader_seals() | SealFlags::SEAL).map_err(sys("seal"))?;
        Ok(LoadPage {
            fd,
            page,
            report_writer: Mutex::new(()),
        })
    }

    /// The fd to hand to readers.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Publishes `load`.
    pub fn publish(&self, load: Load) {
        // Relaxed throughout: each word is a hint read on its own; the
        // sequence only tells a reader the page is alive.
        self.page
            .word(WORD_IN_FLIGHT)
            .store(load.in_flight, Ordering::Relaxed);
        self.page
            .word(WORD_CONNECTIONS)
            .store(load.connections, Ordering::Relaxed);
        self.page
            .word(WORD_PUBLISHED)
            .store(now_ns(), Ordering::Relaxed);
        self.page
            .word(WORD_SEQUENCE)
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Publishes `report` (at most [`REPORT_CAPACITY`] bytes) for readers to
    /// copy whole; the previous one stays if it does not fit.
    pub fn publish_report(&self, report: &[u8]) -> Result<(), TooLarge> {
        let _one = self.report_writer.lock().unwrap_or_else(|e| e.into_inner());
        seqlock::write(self.page.report(), report)
    }
}

/// The read-only side of a load page.
#[derive(Debug)]
pub struct LoadView {
    fd: OwnedFd,
    page: Page,
}

impl LoadView {
    /// Checks the seals and size of a page received from another process,
    /// maps it read-only and checks its magic.
    pub fn open(fd: OwnedFd) -> Result<LoadView, LoadError> {
        let seals = fcntl_get_seals(&fd).map_err(sys("read seals of"))?;
        let missing = reader_seals() - seals;
        if !missing.is_empty() {
            return Err(LoadError::MissingSeals { missing });
        }
        let len = u64::try_from(fstat(&fd).map_err(sys("stat"))?.st_size).unwrap_or(0);
        if len < PAGE_LEN as u64 {
            return Err(LoadError::TooSmall { len });
        }
        let page = Page::map(&fd, ProtFlags::READ)?;
        // Relaxed: the magic was stored before the fd was passed.
        let found = page.word(WORD_MAGIC).load(Ordering::Relaxed);
        if found != MAGIC {
            return Err(LoadError::BadMagic { found });
        }
        Ok(LoadView { fd, page })
    }

    /// The page's fd, to hand on to other readers.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// What the page says now (each word read once).
    pub fn read(&self) -> Reading {
        // Relaxed: hints, each meaningful alone.
        let word = |i| self.page.word(i).load(Ordering::Relaxed);
        let published = word(WORD_PUBLISHED);
        Reading {
            load: Load {
                in_flight: word(WORD_IN_FLIGHT),
                connections: word(WORD_CONNECTIONS),
            },
            sequence: word(WORD_SEQUENCE),
            age: Duration::from_nanos(now_ns().saturating_sub(published)),
        }
    }

    /// A copy of the last report published (`None` before the first): at
    /// most [`REPORT_CAPACITY`] bytes, never a mix of two reports; the
    /// bytes are the writer's and need validating.
    pub fn read_report(&self) -> Result<Option<Vec<u8>>, SeqReadError> {
        seqlock::read(self.page.report())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_see_what_the_writer_publishes_and_cannot_map_it_writable() {
        let page = LoadPage::create().unwrap();
        let view = LoadView::open(page.fd().try_clone_to_owned().unwrap()).unwrap();
        assert_eq!(view.read().sequence, 0);
        page.publish(Load {
            in_flight: 7,
            connections: 1,
        });
        let seen = view.read();
        assert_eq!(
            seen.load,
            Load {
                in_flight: 7,
                connections: 1
            }
        );
        assert_eq!(seen.sequence, 1);
        // A writable mapping is refused by the kernel.
        let fd = page.fd().try_clone_to_owned().unwrap();
        assert!(Page::map(&fd, ProtFlags::READ | ProtFlags::WRITE).is_err());
    }

    #[test]
    fn readers_copy_the_last_report_whole() {
        let page = LoadPage::create().unwrap();
        let view = LoadView::open(page.fd().try_clone_to_owned().unwrap()).unwrap();
        assert_eq!(view.read_report(), Ok(None));
        page.publish_report(b"first").unwrap();
        page.publish_report(&[9; 1000]).unwrap();
        assert_eq!(view.read_report().unwrap().unwrap(), [9; 1000]);
        // Too large: refused, the last report stays.
        let err = page
            .publish_report(&vec![0; REPORT_CAPACITY + 1])
            .unwrap_err();
        assert_eq!(err.capacity, REPORT_CAPACITY);
        assert_eq!(view.read_report().unwrap().unwrap(), [9; 1000]);
        page.publish_report(&vec![1; REPORT_CAPACITY]).unwrap();
        assert_eq!(view.read_report().unwrap().unwrap().len(), REPORT_CAPACITY);
        // The load words are untouched by reports.
        page.publish(Load {
            in_flight: 1,
            connections: 1,
        });
        assert_eq!(view.read().load.in_flight, 1);
    }

    #[test]
    fn unsealed_or_foreign_files_are_refused() {
        let fd = memfd_create("t", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
        ftruncate(&fd, PAGE_LEN as u64).unwrap();
        assert!(matches!(
            LoadView::open(fd.try_clone().unwrap()),
            Err(LoadError::MissingSeals { .. })
        ));
        fcntl_add_seals(&fd, reader_seals()).unwrap();
        assert!(matches!(
            LoadView::open(fd),
            Err(LoadError::BadMagic { found: 0 })
        ));
    }
}
