//! Struct member offsets, enum values and function arities straight from raw BTF, for
//! `snapshot`'s iterator and the tracer's [`crate::offsets`]: one linear pass over
//! /sys/kernel/btf/vmlinux (a few ms) instead of a full parse with indexes (btf-rs took ~0.2 s on
//! a quiet machine, 0.5–0.6 s on a busy one, and ~30 MB of heap). Only the names asked for are
//! compared; everything else is skipped by its size.

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("BTF: {0}")]
    Format(&'static str),
    #[error("kernel BTF has no struct {0}")]
    NoStruct(String),
    #[error("kernel BTF: struct {0} has no member {1}")]
    NoMember(String, String),
    #[error("kernel BTF has no typedef {0}")]
    NoTypedef(String),
    #[error("kernel BTF: {0} is not a function pointer")]
    NotFunctionPointer(String),
}

/// Structs and unions one member lookup may look into (the kernel's need a few dozen at most).
pub const ANONYMOUS_BUDGET: u32 = 4096;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// Raw BTF with the start of every type record (type id `i` at `starts[i - 1]`).
pub struct RawBtf<'a> {
    types: &'a [u8],
    strings: &'a [u8],
    starts: Vec<u32>,
    /// The wanted structs/unions (with members), functions, typedefs and named enums found:
    /// (name, kind, id), first definition of each.
    found: Vec<(&'a [u8], u32, u32)>,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

impl<'a> RawBtf<'a> {
    /// Indexes `bytes` (little-endian BTF, as on x86-64 and arm64), noting the structs, functions,
    /// typedefs and enums named in `wanted` (only those: comparing every name would be the slow
    /// part).
    pub fn parse(bytes: &'a [u8], wanted: &[&str]) -> Result<RawBtf<'a>, ScanError> {
        let bad = ScanError::Format;
        if bytes.get(..2) != Some(&[0x9f, 0xeb]) {
            return Err(bad("bad magic (not little-endian BTF)"));
        }
        let field = |i: usize| u32_at(bytes, 4 + 4 * i).map(|v| v as usize).ok_or(bad("short header"));
        let (hdr_len, type_off, type_len, str_off, str_len) = (field(0)?, field(1)?, field(2)?, field(3)?, field(4)?);
        let types = bytes.get(hdr_len + type_off..hdr_len + type_off + type_len).ok_or(bad("type section out of range"))?;
        let strings = bytes.get(hdr_len + str_off..hdr_len + str_off + str_len).ok_or(bad("string section out of range"))?;
        let mut btf = RawBtf { types, strings, starts: Vec::with_capacity(types.len() / 24), found: Vec::new() };
        let mut at = 0usize;
        while at < types.len() {
            let (Some(name_off), Some(info)) = (u32_at(types, at), u32_at(types, at + 4)) else { return Err(bad("truncated type")) };
            let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                0 | 2 | 7 | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_FUNC | 16 | KIND_TYPE_TAG => 0,
                _ => return Err(bad("unknown type kind")),
            };
            btf.starts.push(u32::try_from(at).map_err(|_| bad("type section too large"))?);
            let named_kind = matches!(kind, KIND_FUNC | KIND_TYPEDEF) || (matches!(kind, KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64) && vlen > 0);
            if named_kind && name_off != 0 {
                let name = btf.name(name_off);
                if wanted.iter().any(|w| w.as_bytes() == name) && !btf.found.iter().any(|f| f.0 == name && f.1 == kind) {
                    let id = u32::try_from(btf.starts.len()).map_err(|_| bad("too many types"))?;
                    btf.found.push((name, kind, id));
                }
            }
            at += 12 + extra;
        }
        Ok(btf)
    }

    fn name(&self, off: u32) -> &'a [u8] {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    }

    /// (kind, `vlen`, `kind_flag`, `size_or_type`, record start) of type `id`.
    fn ty(&self, id: u32) -> Option<(u32, usize, bool, u32, usize)> {
        let at = *self.starts.get(usize::try_from(id).ok()?.checked_sub(1)?)? as usize;
        let info = u32_at(self.types, at + 4)?;
        Some(((info >> 24) & 0x1f, (info & 0xffff) as usize, info >> 31 == 1, u32_at(self.types, at + 8)?, at))
    }

    fn lookup(&self, name: &str, kind: u32) -> Option<u32> {
        self.found.iter().find(|f| f.0 == name.as_bytes() && (f.1 == kind || kind == KIND_STRUCT && f.1 == KIND_UNION)).map(|f| f.2)
    }

    /// Type id of the FUNC named `name` (for a program's attach target); it must have been wanted.
    pub fn func_id(&self, name: &str) -> Option<u32> {
        self.lookup(name, KIND_FUNC)
    }

    /// Byte offset of `member` in `struct name` (a wanted one), looking through anonymous structs
    /// and unions.
    pub fn offset(&self, name: &str, member: &str) -> Result<u32, ScanError> {
        self.offset_path(name, &[member])
    }

    /// Byte offset of `path` (member names, each possibly inside anonymous structs/unions, each
    /// but the last a struct or union) in `struct name` (a wanted one).
    pub fn offset_path(&self, name: &str, path: &[&str]) -> Result<u32, ScanError> {
        let mut id = self.lookup(name, KIND_STRUCT).ok_or_else(|| ScanError::NoStruct(name.to_owned()))?;
        let mut bits = 0;
        for (i, member) in path.iter().enumerate() {
            let missing = || ScanError::NoMember(name.to_owned(), path[..=i].join("."));
            let (off, ty) = self.find(id, member.as_bytes(), 0, &mut ANONYMOUS_BUDGET.clone()).ok_or_else(missing)?;
            bits = u32::checked_add(bits, off).ok_or_else(missing)?;
            id = self.strip(ty).ok_or_else(missing)?;
        }
        if bits.is_multiple_of(8) { Ok(bits / 8) } else { Err(ScanError::NoMember(name.to_owned(), format!("{} (a bitfield)", path.join(".")))) }
    }

    /// Value of enumerator `member` of the (wanted) enum `name`; `None` when either is missing or
    /// the value does not fit in 32 bits.
    pub fn enum_value(&self, name: &str, member: &str) -> Option<u32> {
        let id = self.lookup(name, KIND_ENUM).or_else(|| self.lookup(name, KIND_ENUM64))?;
        self.enumerator(id, member.as_bytes())
    }

    /// Value of `member` in the first anonymous enum that has it (such as `LINUX_MIB_*`: BTF names
    /// no such enum, so every enum is looked at).
    pub fn anonymous_enum_value(&self, member: &str) -> Option<u32> {
        (1..=u32::try_from(self.starts.len()).ok()?).find_map(|id| {
            let (kind, _, _, _, at) = self.ty(id)?;
            (kind == KIND_ENUM && u32_at(self.types, at)? == 0).then(|| self.enumerator(id, member.as_bytes())).flatten()
        })
    }

    fn enumerator(&self, id: u32, member: &[u8]) -> Option<u32> {
        let (kind, vlen, _, _, at) = self.ty(id)?;
        let (size, wide) = match kind {
            KIND_ENUM => (8, false),
            KIND_ENUM64 => (12, true),
            _ => return None,
        };
        (0..vlen).find_map(|i| {
            let m = at + 12 + size * i;
            if self.name(u32_at(self.types, m)?) != member {
                return None;
            }
            let lo = u32_at(self.types, m + 4)?;
            if wide && u32_at(self.types, m + 8)? != 0 {
                return None;
            }
            Some(lo)
        })
    }

    /// Number of parameters of the (wanted) kernel function `name`.
    pub fn func_arity(&self, name: &str) -> Option<usize> {
        let (_, _, _, proto, _) = self.ty(self.func_id(name)?)?;
        let (kind, vlen, ..) = self.ty(proto)?;
        (kind == KIND_FUNC_PROTO).then_some(vlen)
    }

    /// Number of arguments of raw tracepoint `tp` (without the leading `void *ctx`), from the
    /// typedef `btf_trace_<tp>` (a pointer to a function prototype), which must have been wanted.
    pub fn tracepoint_arity(&self, tp: &str) -> Result<usize, ScanError> {
        let name = format!("btf_trace_{tp}");
        let bad = || ScanError::NotFunctionPointer(name.clone());
        let id = self.lookup(&name, KIND_TYPEDEF).ok_or_else(|| ScanError::NoTypedef(name.clone()))?;
        let (_, _, _, ptr, _) = self.ty(id).ok_or_else(bad)?;
        let (kind, _, _, proto, _) = self.ty(ptr).ok_or_else(bad)?;
        let (proto_kind, vlen, ..) = self.ty(proto).ok_or_else(bad)?;
        if kind != KIND_PTR || proto_kind != KIND_FUNC_PROTO {
            return Err(bad());
        }
        Ok(vlen.saturating_sub(1))
    }

    /// Bit offset and type of `member` in struct/union `id`, looking through anonymous members at
    /// most 8 deep and `budget` of them in all (malformed BTF can make them cycle or fan out).
    fn find(&self, id: u32, member: &[u8], depth: u32, budget: &mut u32) -> Option<(u32, u32)> {
        let (kind, vlen, kind_flag, _, at) = self.ty(id)?;
        if (kind != KIND_STRUCT && kind != KIND_UNION) || depth > 8 || *budget == 0 {
            return None;
        }
        *budget -= 1;
        for i in 0..vlen {
            let m = at + 12 + 12 * i;
            let (name_off, ty, off) = (u32_at(self.types, m)?, u32_at(self.types, m + 4)?, u32_at(self.types, m + 8)?);
            let bits = if kind_flag { off & 0x00ff_ffff } else { off };
            if name_off == 0 {
                if let Some((inner, t)) = self.find(self.strip(ty)?, member, depth + 1, budget) {
                    return Some((bits.checked_add(inner)?, t));
                }
            } else if self.name(name_off) == member {
                return Some((bits, ty));
            }
        }
        None
    }

    /// Follows typedef/const/volatile/restrict/type-tag to the underlying type.
    fn strip(&self, mut id: u32) -> Option<u32> {
        for _ in 0..16 {
            let (kind, _, _, next, _) = self.ty(id)?;
            match kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => id = next,
                _ => return Some(id),
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inputs the fuzz target `btf_scan` found: `member-offset-overflow`, an anonymous member
    /// whose bit offset plus the inner member's overflowed u32 (a panic with overflow checks).
    #[test]
    fn fuzz_regressions_btf_scan() {
        for (name, bytes) in crate::offsets::tests::fuzz_regressions("btf_scan") {
            let Ok(raw) = RawBtf::parse(&bytes, &["task_struct", "file", "inode", "bpf_iter_task_file", "sock"]) else { continue };
            for (s, m) in [("task_struct", "tgid"), ("task_struct", "comm"), ("file", "f_inode"), ("inode", "i_ino"), ("sock", "skc_family")] {
                let r = raw.offset(s, m);
                // Its members are out of place: no offset is right, none may come out wrapped.
                assert!(!name.ends_with("member-offset-overflow") || r.is_err(), "{name}: {s}.{m}: {r:?}");
            }
            assert!(raw.func_id("no_such_function").is_none(), "{name}");
        }
    }

    /// The same offsets as the tracer's ([`crate::offsets::resolve`], whose scan of every wanted
    /// type is checked against the full btf-rs parse there) when only a few types are wanted, on this
    /// machine's kernel BTF.
    #[test]
    fn agrees_with_the_full_parse() {
        let path = std::path::Path::new("/sys/kernel/btf/vmlinux");
        let Ok(bytes) = std::fs::read(path) else {
            eprintln!("skipped: no {}", path.display());
            return;
        };
        let wanted = ["task_struct", "files_struct", "file", "socket", "inode", "sock", "sock_common", "bpf_iter_task_file", "no_such_function_here"];
        let raw = RawBtf::parse(&bytes, &wanted).unwrap();
        let full = crate::offsets::resolve(path, std::path::Path::new("/sys/kernel/tracing")).unwrap().offsets;
        assert_eq!(raw.offset("task_struct", "files").unwrap(), full.task_files);
        assert_eq!(raw.offset("files_struct", "fdt").unwrap(), full.files_fdt);
        assert_eq!(raw.offset("file", "private_data").unwrap(), full.file_private_data);
        assert_eq!(raw.offset("socket", "sk").unwrap(), full.socket_sk);
        assert_eq!(raw.offset("inode", "i_ino").unwrap(), full.inode_ino);
        assert_eq!(raw.offset("sock", "sk_ack_backlog").unwrap(), full.sk_ack_backlog);
        // skc_num sits in an anonymous struct inside an anonymous union of struct sock_common.
        let skc_num = raw.offset("sock", "__sk_common").unwrap() + raw.offset("sock_common", "skc_num").unwrap();
        assert_eq!(skc_num, full.skc_num);
        assert!(raw.func_id("bpf_iter_task_file").is_some());
        assert!(raw.func_id("no_such_function_here").is_none());
        assert!(matches!(raw.offset("task_struct", "no_such_member"), Err(ScanError::NoMember(..))));
        assert!(matches!(raw.offset("no_such_struct", "x"), Err(ScanError::NoStruct(_))));
        assert!(raw.offset("tcp_sock", "snd_cwnd").is_err(), "not wanted, not indexed");
        assert!(RawBtf::parse(&bytes[..100], &wanted).is_err());
    }
}
