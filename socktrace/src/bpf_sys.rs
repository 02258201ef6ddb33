//! The few raw bpf(2) commands aya does not offer in the form needed here: walking the ids of
//! every loaded program or link (`foreign`, `kprobe_missed`) and reading a link's info into a
//! caller's `bpf_link_info` prefix (aya's `LinkInfo` hides the per-type union).

use std::{
    collections::BTreeSet,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

pub const BPF_PROG_GET_NEXT_ID: libc::c_long = 11;
pub const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;

/// The `bpf_attr` of the `*_GET_NEXT_ID` and `*_GET_FD_BY_ID` commands, zero-padded.
#[repr(C)]
#[derive(Default)]
struct IdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
    _pad: [u32; 13],
}

/// The `bpf_attr` of `BPF_OBJ_GET_INFO_BY_FD`, zero-padded.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
    _pad: [u32; 12],
}

/// bpf(2) with `attr`: a zero-padded `bpf_attr` prefix of the command's layout.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> libc::c_long {
    let size = libc::c_uint::try_from(size_of::<T>()).unwrap_or(0);
    // SAFETY: `attr` is valid for the call and `size` bytes long; the kernel reads and writes it.
    unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr).cast::<libc::c_void>(), size) }
}

/// Every id the `*_GET_NEXT_ID` command `cmd` walks (empty when bpf(2) refuses the walk).
pub fn ids(cmd: libc::c_long) -> BTreeSet<u32> {
    let mut ids = BTreeSet::new();
    let mut attr = IdAttr::default();
    while bpf(cmd, &mut attr) >= 0 && ids.insert(attr.next_id) {
        attr.id = attr.next_id;
    }
    ids
}

/// The info of link `id` written into `info` (a `bpf_link_info` prefix the kernel fills as far
/// as it knows it); false when the link is gone or bpf(2) refuses.
pub fn link_info<T>(id: u32, info: &mut T) -> bool {
    let mut get = IdAttr { id, ..IdAttr::default() };
    let Ok(fd) = i32::try_from(bpf(BPF_LINK_GET_FD_BY_ID, &mut get)) else { return false };
    if fd < 0 {
        return false;
    }
    // SAFETY: a new fd the kernel just returned; owned (closed) here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let (Ok(bpf_fd), Ok(info_len)) = (u32::try_from(fd.as_raw_fd()), u32::try_from(size_of::<T>())) else { return false };
    let mut attr = InfoAttr { bpf_fd, info_len, info: std::ptr::from_mut(info) as u64, ..InfoAttr::default() };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) >= 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attrs_match_the_uapi() {
        assert_eq!(std::mem::offset_of!(IdAttr, next_id), 4);
        assert_eq!(std::mem::offset_of!(InfoAttr, info), 8);
    }
}
