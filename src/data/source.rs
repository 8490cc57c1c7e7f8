//! Where a split's samples come from, behind one interface: [`Source::Memory`] holds the pixels
//! as one `u8` tensor (IDX, CIFAR, synthetic); [`Source::Folder`] knows only the file list and
//! decodes each batch when it is asked for (`--data imagefolder`). Batching
//! ([`super::Batches`]), subsets, hold-outs and `sgr data info` go through [`Source`], so the
//! training loop does not care which one it has.
use std::fmt;

use tch::Tensor;

use super::Meta;
use super::folder::FolderSplit;

/// One split (train or test) of a data set, held on the CPU.
pub struct Split {
    /// Pixels, `u8 [N, C, H, W]`.
    pub images: Tensor,
    /// Class indices, `i64 [N]`.
    pub labels: Tensor,
}

impl Split {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.size()[0] as usize
    }

    /// Whether the split holds no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first `n` samples (all of them if `n` exceeds the length). Shares storage with `self`;
    /// for quick runs and tests on a fixed, reproducible subset.
    pub fn subset(&self, n: usize) -> Split {
        let n = n.min(self.len()) as i64;
        Split {
            images: self.images.narrow(0, 0, n),
            labels: self.labels.narrow(0, 0, n),
        }
    }

    /// The last `n` samples (all of them if `n` exceeds the length). Shares storage with
    /// `self`; with [`Split::subset`] of the rest, a held-out part of the training split.
    pub fn tail(&self, n: usize) -> Split {
        let n = n.min(self.len());
        let start = (self.len() - n) as i64;
        Split {
            images: self.images.narrow(0, start, n as i64),
            labels: self.labels.narrow(0, start, n as i64),
        }
    }

    /// A second handle on the same tensors (tensors are not `Clone`; this copies no data).
    pub fn shallow_clone(&self) -> Split {
        Split {
            images: self.images.shallow_clone(),
            labels: self.labels.shallow_clone(),
        }
    }
}

impl fmt::Debug for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Split")
            .field("images", &(self.images.size(), self.images.kind()))
            .field("labels", &(self.labels.size(), self.labels.kind()))
            .finish()
    }
}

/// The samples of one split: in memory, or a folder streamed from disk.
pub enum Source {
    /// Every image in one CPU tensor.
    Memory(Split),
    /// Files decoded batch by batch (never all in memory).
    Folder(FolderSplit),
}

impl Source {
    /// Number of samples.
    pub fn len(&self) -> usize {
        match self {
            Source::Memory(s) => s.len(),
            Source::Folder(f) => f.len(),
        }
    }

    /// Whether the split holds no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first `n` samples (all of them if `n` exceeds the length), sharing storage.
    pub fn subset(&self, n: usize) -> Source {
        match self {
            Source::Memory(s) => Source::Memory(s.subset(n)),
            Source::Folder(f) => Source::Folder(f.subset(n)),
        }
    }

    /// The last `n` samples (all of them if `n` exceeds the length), sharing storage.
    pub fn tail(&self, n: usize) -> Source {
        match self {
            Source::Memory(s) => Source::Memory(s.tail(n)),
            Source::Folder(f) => Source::Folder(f.tail(n)),
        }
    }

    /// A second handle on the same samples (copies no pixels).
    pub fn shallow_clone(&self) -> Source {
        match self {
            Source::Memory(s) => Source::Memory(s.shallow_clone()),
            Source::Folder(f) => Source::Folder(f.clone()),
        }
    }

    /// Every label, in stored order (a folder's come from its scan: no image is decoded).
    pub fn labels(&self) -> Vec<i64> {
        match self {
            Source::Memory(s) => Vec::<i64>::try_from(&s.labels).expect("labels are i64"),
            Source::Folder(f) => f.labels().to_vec(),
        }
    }

    /// The in-memory split, if this is one (tests and tools that look at raw pixels).
    pub fn memory(&self) -> Option<&Split> {
        match self {
            Source::Memory(s) => Some(s),
            Source::Folder(_) => None,
        }
    }

    /// The in-memory split, mutably (tests that doctor pixels).
    pub fn memory_mut(&mut self) -> Option<&mut Split> {
        match self {
            Source::Memory(s) => Some(s),
            Source::Folder(_) => None,
        }
    }

    /// The streamed folder split, if this is one.
    pub fn folder(&self) -> Option<&FolderSplit> {
        match self {
            Source::Memory(_) => None,
            Source::Folder(f) => Some(f),
        }
    }
}

impl From<Split> for Source {
    fn from(s: Split) -> Source {
        Source::Memory(s)
    }
}

impl From<&Split> for Source {
    fn from(s: &Split) -> Source {
        Source::Memory(s.shallow_clone())
    }
}

impl From<&Source> for Source {
    fn from(s: &Source) -> Source {
        s.shallow_clone()
    }
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Memory(s) => s.fmt(f),
            Source::Folder(s) => s.fmt(f),
        }
    }
}

/// A loaded data set: its description and both splits.
#[derive(Debug)]
pub struct Dataset {
    /// Shape, classes, normalisation, augmentation (a folder's come from its scan).
    pub meta: Meta,
    /// Training split.
    pub train: Source,
    /// Test split (a folder's `val`).
    pub test: Source,
}

impl Dataset {
    /// Class names in label order: the folder names of a folder set, `class K` otherwise.
    pub fn class_names(&self) -> Vec<String> {
        match &self.train {
            Source::Folder(f) => f.class_names().to_vec(),
            Source::Memory(_) => (0..self.meta.classes)
                .map(|k| format!("class {k}"))
                .collect(),
        }
    }
}
