//! The one filter every command takes: ss's expression language (`sport = :8080`,
//! `dst 10.0.0.0/8`, `not (src [::1] or dport > :1024)`), ss's leading state clauses
//! (`state established`, `exclude time-wait`, the groups `connected`, `synchronized`, `bucket`,
//! `big`, `all`) and a `netns NS` term, tokenized and parsed by recursive descent into an [`Expr`]
//! tree. [`Filter`] is what the tracing commands hold: the `--port/--pid/--netns` shorthands and
//! the expression, applied to listeners (`top`, `serve`, `diagnose`) or to events (`watch`).
//! `snapshot` evaluates the [`Expr`] per socket and asks the kernel for the [`States`].
//!
//! A term a command cannot apply (`dport` where only listeners are shown, `state` on events) is
//! a usage error naming its position ([`Parsed::check`]), never silently ignored.
//!
//! Grammar (precedence `not` > `and` > `or`; two terms side by side mean `and`, as in ss):
//!
//! ```text
//! filter  := ( ("state" | "exclude" | "excl") STATE )* [expr]
//! expr    := and ( ("or" | "||" | "|") and )*
//! and     := unary ( ["and" | "&&" | "&"] unary )*
//! unary   := ("not" | "!") unary | "(" expr ")" | cond
//! cond    := ("sport" | "dport") [portop] port
//!          | ("src" | "dst") ["=" | "==" | "eq" | "!=" | "neq" | "ne"] host
//!          | "netns" ["=" | "==" | "eq" | "!=" | "neq" | "ne"] NETNS
//! portop  := "=" | "==" | "eq" | "!=" | "neq" | "ne" | "<" | "lt" | ">" | "gt" | "<=" | "le" | ">=" | "ge"
//! port    := ":N" | "N" | "*:N"
//! host    := ADDR[/PREFIX][:PORT] | [V6ADDR][/PREFIX][:PORT] | V6ADDR[/PREFIX] | :PORT | * | *:PORT
//! ```
//!
//! State clauses follow ss (`misc/ss.c`, `scan_state` and `main`): the first `state` starts from
//! no state, the first `exclude` from all of them; each further clause adds or removes states.

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::{event::Record, model::DiagSample, snapshot::diag::TcpState};

/// A parse error, one line, naming the offending token and its position (1-based, in the
/// arguments joined by spaces).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad filter at {pos}: {message}")]
pub struct FilterError {
    pub pos: usize,
    pub message: String,
}

/// Which end of the connection a condition looks at: `s*` is the local end, `d*` the peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Src,
    Dst,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortOp {
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
}

/// An address with a prefix length (a single host when the prefix is the full width).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Net {
    pub addr: IpAddr,
    pub prefix: u8,
}

/// `src`/`dst` operand: an optional network and an optional port; both absent means "any".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostCond {
    pub net: Option<Net>,
    pub port: Option<u16>,
}

/// A node of the expression; leaves keep their position for [`Parsed::check`]'s errors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expr {
    Or(Box<Expr>, Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Port { side: Side, op: PortOp, port: u16, pos: usize },
    Host { side: Side, cond: HostCond, pos: usize },
    /// `netns NS`: `spec` as written, `inode` once [`Parsed::resolve_netns`] has looked it up.
    Netns { spec: String, inode: Option<u32>, pos: usize },
}

/// One end of a socket or event; the address is `None` when the source could not know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct End {
    pub ip: Option<IpAddr>,
    pub port: u16,
}

impl From<std::net::SocketAddr> for End {
    fn from(a: std::net::SocketAddr) -> End {
        End { ip: Some(a.ip()), port: a.port() }
    }
}

/// What an expression is evaluated against.
#[derive(Clone, Copy, Debug)]
pub struct Subject {
    pub netns: u32,
    pub local: End,
    /// `None` where there is no peer to speak of (a listener in a listener view).
    pub peer: Option<End>,
}

impl Expr {
    /// Whether the subject matches. A listener listed by `sock_diag` has the all-zero peer with
    /// port 0, as the kernel reports it (so `dport = :0` selects listeners in `snapshot`, as in ss).
    pub fn matches(&self, s: &Subject) -> bool {
        match self {
            Expr::Or(a, b) => a.matches(s) || b.matches(s),
            Expr::And(a, b) => a.matches(s) && b.matches(s),
            Expr::Not(e) => !e.matches(s),
            Expr::Port { side, op, port, .. } => {
                let Some(end) = pick(*side, s) else { return false };
                let p = end.port;
                match op {
                    PortOp::Eq => p == *port,
                    PortOp::Ne => p != *port,
                    PortOp::Lt => p < *port,
                    PortOp::Gt => p > *port,
                    PortOp::Le => p <= *port,
                    PortOp::Ge => p >= *port,
                }
            }
            Expr::Host { side, cond, .. } => {
                let Some(end) = pick(*side, s) else { return false };
                cond.port.is_none_or(|p| p == end.port) && cond.net.is_none_or(|n| end.ip.is_some_and(|ip| n.contains(ip)))
            }
            Expr::Netns { inode, .. } => *inode == Some(s.netns),
        }
    }

    /// Whether a `src` condition with an address occurs (its result depends on the local address).
    fn uses_local_address(&self) -> bool {
        match self {
            Expr::Or(a, b) | Expr::And(a, b) => a.uses_local_address() || b.uses_local_address(),
            Expr::Not(e) => e.uses_local_address(),
            Expr::Host { side: Side::Src, cond, .. } => cond.net.is_some(),
            Expr::Port { .. } | Expr::Host { .. } | Expr::Netns { .. } => false,
        }
    }

    /// The first leaf, in reading order, for which `bad` says why it cannot be applied.
    fn first_bad(&self, bad: &impl Fn(&Expr) -> Option<String>) -> Option<(usize, String)> {
        match self {
            Expr::Or(a, b) | Expr::And(a, b) => a.first_bad(bad).or_else(|| b.first_bad(bad)),
            Expr::Not(e) => e.first_bad(bad),
            Expr::Port { pos, .. } | Expr::Host { pos, .. } | Expr::Netns { pos, .. } => bad(self).map(|m| (*pos, m)),
        }
    }

    /// The terms every match must satisfy: the operands of the top-level `and` chain.
    fn conjuncts(&self) -> Vec<&Expr> {
        match self {
            Expr::And(a, b) => {
                let mut v = a.conjuncts();
                v.extend(b.conjuncts());
                v
            }
            e => vec![e],
        }
    }

    fn netns_terms(&mut self, f: &mut dyn FnMut(&mut Expr)) {
        match self {
            Expr::Or(a, b) | Expr::And(a, b) => {
                a.netns_terms(f);
                b.netns_terms(f);
            }
            Expr::Not(e) => e.netns_terms(f),
            Expr::Netns { .. } => f(self),
            Expr::Port { .. } | Expr::Host { .. } => {}
        }
    }
}

fn pick(side: Side, s: &Subject) -> Option<End> {
    match side {
        Side::Src => Some(s.local),
        Side::Dst => s.peer,
    }
}

impl Net {
    /// Prefix match; an IPv4 network also matches IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`,
    /// what a dual-stack socket shows for an IPv4 peer).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V6(v6)) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            _ => ip,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// A set of TCP states (bit `1 << n` for the kernel's state number `n`, as in ss), with the
/// position of the first clause that made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct States {
    pub mask: u32,
    pub pos: usize,
}

/// Every state socktrace lists (ss's `all`; request sockets count as `syn-recv`).
pub const ALL_STATES: u32 = {
    let mut m = 0;
    let mut i = 0;
    while i < TcpState::ALL.len() {
        m |= 1 << (TcpState::ALL[i] as u32);
        i += 1;
    }
    m
};

const fn bit(s: TcpState) -> u32 {
    1 << (s as u32)
}

/// ss's default for TCP without `-a`, `-l` or a state clause (`SS_CONN`): all but listening,
/// closed, time-wait and syn-recv.
pub const SS_CONNECTED: u32 = ALL_STATES & !(bit(TcpState::Listen) | bit(TcpState::Close) | bit(TcpState::TimeWait) | bit(TcpState::SynRecv));

impl States {
    pub fn contains(&self, s: TcpState) -> bool {
        self.mask & bit(s) != 0
    }

    /// The states in kernel order.
    pub fn list(mask: u32) -> Vec<TcpState> {
        TcpState::ALL.into_iter().filter(|s| mask & bit(*s) != 0).collect()
    }
}

/// ss's state names and groups (`scan_state` in ss.c), case-insensitive.
pub fn state_by_name(name: &str) -> Option<u32> {
    let n = name.to_ascii_lowercase();
    let one = |s| Some(bit(s));
    match n.as_str() {
        "all" => Some(ALL_STATES),
        "connected" => Some(ALL_STATES & !(bit(TcpState::Close) | bit(TcpState::Listen))),
        "synchronized" => Some(ALL_STATES & !(bit(TcpState::Close) | bit(TcpState::Listen) | bit(TcpState::SynSent))),
        "bucket" => Some(bit(TcpState::SynRecv) | bit(TcpState::TimeWait)),
        "big" => Some(ALL_STATES & !(bit(TcpState::SynRecv) | bit(TcpState::TimeWait))),
        "established" => one(TcpState::Established),
        "syn-sent" => one(TcpState::SynSent),
        "syn-recv" | "syn-rcv" => one(TcpState::SynRecv),
        "fin-wait-1" => one(TcpState::FinWait1),
        "fin-wait-2" => one(TcpState::FinWait2),
        "time-wait" => one(TcpState::TimeWait),
        "unconnected" | "close" | "closed" => one(TcpState::Close),
        "close-wait" => one(TcpState::CloseWait),
        "last-ack" => one(TcpState::LastAck),
        "listening" | "listen" => one(TcpState::Listen),
        "closing" => one(TcpState::Closing),
        _ => None,
    }
}

const STATE_NAMES: &str = "established, syn-sent, syn-recv, fin-wait-1, fin-wait-2, time-wait, closed, close-wait, last-ack, listening, closing, or a group: all, connected, synchronized, bucket, big";

/// A parsed FILTER argument list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    /// From `state`/`exclude` clauses; `None` without any.
    pub states: Option<States>,
    pub expr: Option<Expr>,
}

/// What a command applies the filter to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every socket (`snapshot`): all terms.
    Sockets,
    /// Listening sockets (`top`, `serve`, `diagnose`): no peer, state must include listening.
    Listeners,
    /// Events (`watch`): both ends, no state.
    Events,
}

impl Parsed {
    /// Refuses what `command` cannot apply, naming the position and why.
    pub fn check(&self, scope: Scope, command: &str) -> Result<(), FilterError> {
        if let Some(st) = self.states {
            match scope {
                Scope::Sockets => {}
                Scope::Listeners if st.contains(TcpState::Listen) => {}
                Scope::Listeners => {
                    return fail(st.pos, format!("{command} shows listening sockets and this state selection leaves them out"));
                }
                Scope::Events => {
                    return fail(st.pos, format!("{command} filters events, which have no socket state (state and exclude apply to snapshot, top, serve and diagnose)"));
                }
            }
        }
        let Some(e) = &self.expr else { return Ok(()) };
        if scope == Scope::Listeners {
            let bad = |leaf: &Expr| match leaf {
                Expr::Port { side: Side::Dst, .. } => Some(format!("dport: {command} shows listeners, which have no peer (use sport)")),
                Expr::Host { side: Side::Dst, .. } => Some(format!("dst: {command} shows listeners, which have no peer (use src)")),
                _ => None,
            };
            if let Some((pos, m)) = e.first_bad(&bad) {
                return fail(pos, m);
            }
        }
        Ok(())
    }

    /// Looks up every `netns` term (name, path or inode) with `lookup`.
    pub fn resolve_netns<E>(&mut self, mut lookup: impl FnMut(&str) -> Result<u32, E>) -> Result<(), E> {
        let Some(e) = &mut self.expr else { return Ok(()) };
        let mut err = None;
        e.netns_terms(&mut |leaf| {
            if let Expr::Netns { spec, inode, .. } = leaf
                && err.is_none()
            {
                match lookup(spec) {
                    Ok(i) => *inode = Some(i),
                    Err(x) => err = Some(x),
                }
            }
        });
        err.map_or(Ok(()), Err)
    }
}

/// Parses the FILTER arguments (joined by spaces). No arguments: no filter.
pub fn parse(args: &[String]) -> Result<Parsed, FilterError> {
    let text = args.join(" ");
    let tokens = tokenize(&text)?;
    let mut p = Parser { tokens, at: 0, end: text.chars().count() + 1 };
    let states = p.states()?;
    if p.peek().is_none() {
        return Ok(Parsed { states, expr: None });
    }
    let e = p.expr()?;
    if let Some(t) = p.peek() {
        let msg = if t.kind == Tok::RParen { "unbalanced \")\"".to_owned() } else { format!("unexpected {}", t.describe()) };
        return Err(FilterError { pos: t.pos, message: msg });
    }
    Ok(Parsed { states, expr: Some(e) })
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    LParen,
    RParen,
    /// `=`, `==`, `!=`, `<`, `>`, `<=`, `>=`.
    Cmp(PortOp),
    /// `!`
    Bang,
    /// `&&` or `&`
    AndSym,
    /// `||` or `|`
    OrSym,
    Word(String),
}

#[derive(Clone, Debug)]
struct Token {
    kind: Tok,
    /// 1-based character position in the joined text.
    pos: usize,
}

impl Token {
    fn describe(&self) -> String {
        match &self.kind {
            Tok::LParen => "\"(\"".into(),
            Tok::RParen => "\")\"".into(),
            Tok::Cmp(op) => format!("\"{}\"", op_symbol(*op)),
            Tok::Bang => "\"!\"".into(),
            Tok::AndSym => "\"&&\"".into(),
            Tok::OrSym => "\"||\"".into(),
            Tok::Word(w) => format!("{w:?}"),
        }
    }

    fn word(&self) -> Option<&str> {
        if let Tok::Word(w) = &self.kind { Some(w) } else { None }
    }
}

fn is_special(c: char) -> bool {
    matches!(c, '(' | ')' | '=' | '!' | '<' | '>' | '&' | '|')
}

fn tokenize(text: &str) -> Result<Vec<Token>, FilterError> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let pos = i + 1;
        let next = chars.get(i + 1).copied();
        let (kind, len) = match (c, next) {
            (c, _) if c.is_whitespace() => {
                i += 1;
                continue;
            }
            ('(', _) => (Tok::LParen, 1),
            (')', _) => (Tok::RParen, 1),
            ('=', Some('=')) => (Tok::Cmp(PortOp::Eq), 2),
            ('=', _) => (Tok::Cmp(PortOp::Eq), 1),
            ('!', Some('=')) => (Tok::Cmp(PortOp::Ne), 2),
            ('!', _) => (Tok::Bang, 1),
            ('<', Some('=')) => (Tok::Cmp(PortOp::Le), 2),
            ('<', _) => (Tok::Cmp(PortOp::Lt), 1),
            ('>', Some('=')) => (Tok::Cmp(PortOp::Ge), 2),
            ('>', _) => (Tok::Cmp(PortOp::Gt), 1),
            ('&', Some('&')) => (Tok::AndSym, 2),
            ('&', _) => (Tok::AndSym, 1),
            ('|', Some('|')) => (Tok::OrSym, 2),
            ('|', _) => (Tok::OrSym, 1),
            _ => {
                let start = i;
                while i < chars.len() && !chars[i].is_whitespace() && !is_special(chars[i]) {
                    i += 1;
                }
                out.push(Token { kind: Tok::Word(chars[start..i].iter().collect()), pos });
                continue;
            }
        };
        out.push(Token { kind, pos });
        i += len;
    }
    if out.len() > 10_000 {
        return Err(FilterError { pos: 1, message: "expression too long".into() });
    }
    Ok(out)
}

fn op_symbol(op: PortOp) -> &'static str {
    match op {
        PortOp::Eq => "=",
        PortOp::Ne => "!=",
        PortOp::Lt => "<",
        PortOp::Gt => ">",
        PortOp::Le => "<=",
        PortOp::Ge => ">=",
    }
}

fn word_op(w: &str) -> Option<PortOp> {
    Some(match w {
        "eq" => PortOp::Eq,
        "neq" | "ne" => PortOp::Ne,
        "lt" => PortOp::Lt,
        "gt" => PortOp::Gt,
        "le" => PortOp::Le,
        "ge" => PortOp::Ge,
        _ => return None,
    })
}

fn fail<T>(pos: usize, message: impl Into<String>) -> Result<T, FilterError> {
    Err(FilterError { pos, message: message.into() })
}

/// Nesting limit, so a hostile expression cannot overflow the stack.
const MAX_DEPTH: usize = 100;

struct Parser {
    tokens: Vec<Token>,
    at: usize,
    /// Position reported for "end of expression".
    end: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.at).cloned();
        self.at += 1;
        t
    }

    fn expr(&mut self) -> Result<Expr, FilterError> {
        self.expr_at(0)
    }

    fn expr_at(&mut self, depth: usize) -> Result<Expr, FilterError> {
        if depth > MAX_DEPTH {
            let pos = self.peek().map_or(self.end, |t| t.pos);
            return fail(pos, "expression nested too deeply");
        }
        let mut left = self.and(depth)?;
        while let Some(t) = self.peek() {
            let is_or = t.kind == Tok::OrSym || t.word() == Some("or");
            if !is_or {
                break;
            }
            self.at += 1;
            let right = self.and(depth)?;
            left = Expr::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and(&mut self, depth: usize) -> Result<Expr, FilterError> {
        let mut left = self.unary(depth)?;
        while let Some(t) = self.peek() {
            if t.kind == Tok::AndSym || t.word() == Some("and") {
                self.at += 1;
            } else if !self.starts_term() {
                break;
            }
            let right = self.unary(depth)?;
            left = Expr::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    /// Whether the next token can begin a term (implicit `and` between juxtaposed terms).
    fn starts_term(&self) -> bool {
        self.peek().is_some_and(|t| match &t.kind {
            Tok::LParen | Tok::Bang => true,
            Tok::Word(w) => matches!(w.as_str(), "not" | "sport" | "dport" | "src" | "dst" | "netns" | "state" | "exclude" | "excl"),
            _ => false,
        })
    }

    fn unary(&mut self, depth: usize) -> Result<Expr, FilterError> {
        let Some(t) = self.next() else {
            return fail(self.end, "expression ends where a condition was expected");
        };
        match &t.kind {
            Tok::Bang => Ok(Expr::Not(Box::new(self.unary_nested(depth)?))),
            Tok::Word(w) if w == "not" => Ok(Expr::Not(Box::new(self.unary_nested(depth)?))),
            Tok::LParen => {
                if self.peek().is_some_and(|n| n.kind == Tok::RParen) {
                    return fail(t.pos, "empty parentheses");
                }
                let e = self.expr_at(depth + 1)?;
                match self.next() {
                    Some(c) if c.kind == Tok::RParen => Ok(e),
                    Some(other) => fail(other.pos, format!("expected \")\" to close \"(\" at {}, found {}", t.pos, other.describe())),
                    None => fail(self.end, format!("missing \")\" to close \"(\" at {}", t.pos)),
                }
            }
            Tok::Word(w) => match w.as_str() {
                "sport" => self.port_cond(Side::Src, &t),
                "dport" => self.port_cond(Side::Dst, &t),
                "src" => self.host_cond(Side::Src, &t),
                "dst" => self.host_cond(Side::Dst, &t),
                "netns" => self.netns_cond(&t),
                "state" | "exclude" | "excl" => fail(t.pos, format!("{w:?} comes before the expression, as in ss (state established '( sport = :443 )')")),
                _ => fail(t.pos, format!("unknown term {w:?} (expected sport, dport, src, dst, netns, not or \"(\")")),
            },
            _ => fail(t.pos, format!("unexpected {} where a condition was expected", t.describe())),
        }
    }

    fn unary_nested(&mut self, depth: usize) -> Result<Expr, FilterError> {
        if depth > MAX_DEPTH {
            return fail(self.peek().map_or(self.end, |t| t.pos), "expression nested too deeply");
        }
        self.unary(depth + 1)
    }

    /// An optional comparison operator (symbol or word).
    fn op(&mut self) -> Option<(PortOp, Token)> {
        let t = self.peek()?.clone();
        let op = match &t.kind {
            Tok::Cmp(op) => *op,
            Tok::Word(w) => word_op(w)?,
            _ => return None,
        };
        self.at += 1;
        Some((op, t))
    }

    fn port_cond(&mut self, side: Side, kw: &Token) -> Result<Expr, FilterError> {
        let kw_text = kw.word().unwrap_or_default().to_owned();
        let (op, op_text) = match self.op() {
            Some((op, _)) => (op, format!("{kw_text} {}", op_symbol(op))),
            None => (PortOp::Eq, kw_text),
        };
        let Some(t) = self.next() else {
            return fail(self.end, format!("expected a port after \"{op_text}\" (like :8080)"));
        };
        let Some(w) = t.word() else {
            return fail(t.pos, format!("expected a port after \"{op_text}\" (like :8080), found {}", t.describe()));
        };
        let digits = w.strip_prefix("*:").or_else(|| w.strip_prefix(':')).unwrap_or(w);
        match parse_port(digits) {
            Some(port) => Ok(Expr::Port { side, op, port, pos: kw.pos }),
            None => fail(t.pos, format!("{w:?} is not a port (expected :N with N from 0 to 65535)")),
        }
    }

    fn host_cond(&mut self, side: Side, kw: &Token) -> Result<Expr, FilterError> {
        let kw_text = kw.word().unwrap_or_default().to_owned();
        let negate = match self.op() {
            None | Some((PortOp::Eq, _)) => false,
            Some((PortOp::Ne, _)) => true,
            Some((op, t)) => {
                return fail(t.pos, format!("\"{}\" compares ports; {kw_text} takes =, == or != (or use {}port)", op_symbol(op), &kw_text[..1]));
            }
        };
        let Some(t) = self.next() else {
            return fail(self.end, format!("expected an address after \"{kw_text}\" (like 10.0.0.0/8, [::1]:80 or :8080)"));
        };
        let Some(w) = t.word() else {
            return fail(t.pos, format!("expected an address after \"{kw_text}\", found {}", t.describe()));
        };
        let cond = parse_host(w).map_err(|m| FilterError { pos: t.pos, message: format!("{w:?}: {m}") })?;
        let e = Expr::Host { side, cond, pos: kw.pos };
        Ok(if negate { Expr::Not(Box::new(e)) } else { e })
    }

    /// `netns [=|!=] NS`: a namespace name (/run/netns), path or inode, looked up later.
    fn netns_cond(&mut self, kw: &Token) -> Result<Expr, FilterError> {
        let negate = match self.op() {
            None | Some((PortOp::Eq, _)) => false,
            Some((PortOp::Ne, _)) => true,
            Some((op, t)) => return fail(t.pos, format!("netns takes =, == or !=, not \"{}\"", op_symbol(op))),
        };
        let Some(t) = self.next() else {
            return fail(self.end, "expected a network namespace after \"netns\" (a name, path or inode)");
        };
        let Some(w) = t.word() else {
            return fail(t.pos, format!("expected a network namespace after \"netns\", found {}", t.describe()));
        };
        let e = Expr::Netns { spec: w.to_owned(), inode: None, pos: kw.pos };
        Ok(if negate { Expr::Not(Box::new(e)) } else { e })
    }

    /// ss's leading `state NAME` / `exclude NAME` clauses.
    fn states(&mut self) -> Result<Option<States>, FilterError> {
        let mut out: Option<States> = None;
        while let Some(t) = self.peek().cloned() {
            let include = match t.word() {
                Some("state") => true,
                Some("exclude" | "excl") => false,
                _ => break,
            };
            self.at += 1;
            let kw = t.word().unwrap_or_default().to_owned();
            let Some(n) = self.next() else {
                return fail(self.end, format!("expected a state after \"{kw}\" ({STATE_NAMES})"));
            };
            let Some(mask) = n.word().and_then(state_by_name) else {
                return fail(n.pos, format!("unknown state {} (expected {STATE_NAMES})", n.describe()));
            };
            let st = out.get_or_insert(States { mask: if include { 0 } else { ALL_STATES }, pos: t.pos });
            if include {
                st.mask |= mask;
            } else {
                st.mask &= !mask;
            }
        }
        Ok(out)
    }
}

fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u16>().ok()
}

/// `a.b.c.d[/n][:port]`, `[v6][/n][:port]`, `[v6/n][:port]`, `v6[/n]`, `:port`, `*`, `*:port`.
fn parse_host(w: &str) -> Result<HostCond, String> {
    let port_of = |p: &str| -> Result<Option<u16>, String> {
        if p == "*" {
            return Ok(None);
        }
        parse_port(p).map(Some).ok_or_else(|| format!("{p:?} is not a port"))
    };
    if w == "*" {
        return Ok(HostCond { net: None, port: None });
    }
    if let Some(p) = w.strip_prefix("*:").or_else(|| w.strip_prefix(':')) {
        return Ok(HostCond { net: None, port: port_of(p)? });
    }
    if let Some(rest) = w.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or("missing \"]\"")?;
        let (addr, mut prefix) = match inside.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (inside, None),
        };
        let (outer_prefix, after) = match after.strip_prefix('/') {
            Some(r) => r.split_once(':').map_or((Some(r), ""), |(p, _)| (Some(p), &after[p.len() + 1..])),
            None => (None, after),
        };
        if outer_prefix.is_some() {
            if prefix.is_some() {
                return Err("prefix length given twice".into());
            }
            prefix = outer_prefix;
        }
        let port = match after {
            "" => None,
            a => port_of(a.strip_prefix(':').ok_or("expected \":PORT\" after \"]\"")?)?,
        };
        let ip: Ipv6Addr = addr.parse().map_err(|_| format!("{addr:?} is not an IPv6 address"))?;
        return Ok(HostCond { net: Some(net(IpAddr::V6(ip), prefix)?), port });
    }
    if w.matches(':').count() > 1 {
        // Bare IPv6 (no port possible without brackets).
        let (addr, prefix) = w.split_once('/').map_or((w, None), |(a, p)| (a, Some(p)));
        let ip: Ipv6Addr = addr.parse().map_err(|_| format!("{addr:?} is not an IPv6 address (write [ADDR]:PORT for a port)"))?;
        return Ok(HostCond { net: Some(net(IpAddr::V6(ip), prefix)?), port: None });
    }
    let (hostpart, port) = match w.split_once(':') {
        Some((h, p)) => (h, port_of(p)?),
        None => (w, None),
    };
    let (addr, prefix) = hostpart.split_once('/').map_or((hostpart, None), |(a, p)| (a, Some(p)));
    if addr == "*" {
        return Ok(HostCond { net: None, port });
    }
    let ip: Ipv4Addr = addr.parse().map_err(|_| format!("{addr:?} is not an IP address (host names are not resolved)"))?;
    Ok(HostCond { net: Some(net(IpAddr::V4(ip), prefix)?), port })
}

fn net(addr: IpAddr, prefix: Option<&str>) -> Result<Net, String> {
    let width: u8 = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => width,
        Some(p) => match p.parse::<u8>() {
            Ok(n) if n <= width && !p.starts_with('+') => n,
            _ => return Err(format!("prefix length {p:?} is not between 0 and {width}")),
        },
    };
    Ok(Net { addr, prefix })
}

/// Fully parenthesised rendering (shows how an expression was grouped).
impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let side = |s: &Side, a: &'static str, b: &'static str| if *s == Side::Src { a } else { b };
        match self {
            Expr::Or(a, b) => write!(f, "({a} or {b})"),
            Expr::And(a, b) => write!(f, "({a} and {b})"),
            Expr::Not(e) => write!(f, "not {e}"),
            Expr::Port { side: s, op, port, .. } => write!(f, "{} {} :{port}", side(s, "sport", "dport"), op_symbol(*op)),
            Expr::Netns { spec, .. } => write!(f, "netns {spec}"),
            Expr::Host { side: s, cond, .. } => {
                write!(f, "{} ", side(s, "src", "dst"))?;
                match cond.net {
                    Some(Net { addr: IpAddr::V6(a), prefix }) => write!(f, "[{a}]/{prefix}")?,
                    Some(Net { addr: IpAddr::V4(a), prefix }) => write!(f, "{a}/{prefix}")?,
                    None => write!(f, "*")?,
                }
                match cond.port {
                    Some(p) => write!(f, ":{p}"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// The filter a tracing command holds: the `--port`, `--pid` and `--netns` shorthands and the
/// expression, all of which must match.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// `--port`: the listener's port (listener views), either end's port (`watch`).
    pub port: Option<u16>,
    /// `--pid`: the process an event happened in (`watch` only).
    pub pid: Option<u32>,
    /// `--netns`: one network namespace.
    pub netns: Option<u32>,
    pub expr: Option<Expr>,
    /// Whether the expression depends on the local address (a `src` with an address).
    by_addr: bool,
    /// Listener views with `by_addr`: per (netns, port), whether one of its LISTEN sockets matched
    /// when last seen (a `sock_diag` sample, or the listener side of an accept or listen event).
    /// The kernel's per-listener counters are per port and carry no address.
    seen: HashMap<(u32, u16), bool>,
    /// Likewise per LISTEN socket inode (the kernel's per-socket rows carry no address either).
    seen_sockets: HashMap<u32, bool>,
}

impl Filter {
    pub fn new(port: Option<u16>, pid: Option<u32>, netns: Option<u32>, expr: Option<Expr>) -> Filter {
        let by_addr = expr.as_ref().is_some_and(Expr::uses_local_address);
        Filter { port, pid, netns, expr, by_addr, seen: HashMap::new(), seen_sockets: HashMap::new() }
    }

    /// The local port every match has: `--port` (in listener views, the listener's port), else a
    /// `sport = :P` or `src …:P` term the whole expression requires.
    pub fn local_port(&self) -> Option<u16> {
        self.port.or_else(|| self.required_port(|side| side == Side::Src))
    }

    /// A port every match has at one end or the other: what the kernel's coarse ring pre-filter
    /// can use (`--port`, or a required `sport`/`dport`/`src`/`dst` port).
    pub fn any_end_port(&self) -> Option<u16> {
        self.port.or_else(|| self.required_port(|_| true))
    }

    /// The network namespace every match is in: `--netns`, else a required `netns NS` term.
    pub fn required_netns(&self) -> Option<u32> {
        self.netns.or_else(|| {
            self.expr.as_ref()?.conjuncts().into_iter().find_map(|e| match e {
                Expr::Netns { inode, .. } => *inode,
                _ => None,
            })
        })
    }

    fn required_port(&self, side_ok: impl Fn(Side) -> bool) -> Option<u16> {
        self.expr.as_ref()?.conjuncts().into_iter().find_map(|e| match e {
            Expr::Port { side, op: PortOp::Eq, port, .. } if side_ok(*side) => Some(*port),
            Expr::Host { side, cond: HostCond { port: Some(port), .. }, .. } if side_ok(*side) => Some(*port),
            _ => None,
        })
    }

    fn listener_subject(netns: u32, ip: Option<IpAddr>, lport: u16) -> Subject {
        Subject { netns, local: End { ip, port: lport }, peer: None }
    }

    fn shorthands_listener(&self, netns: u32, lport: u16) -> bool {
        self.port.is_none_or(|p| p == lport) && self.netns.is_none_or(|n| n == netns)
    }

    /// Listener views: whether the listener on `lport` in `netns` is shown. Exact unless the
    /// expression has a `src` address; then the port is shown when one of its LISTEN sockets
    /// matched when last seen.
    pub fn matches_listener(&self, netns: u32, lport: u16) -> bool {
        if !self.shorthands_listener(netns, lport) {
            return false;
        }
        match &self.expr {
            None => true,
            Some(_) if self.by_addr => self.seen.get(&(netns, lport)).copied().unwrap_or(false),
            Some(e) => e.matches(&Self::listener_subject(netns, None, lport)),
        }
    }

    /// Listener views: the LISTEN socket `inode` of the listener on `lport` (the kernel's
    /// per-socket rows). With a `src` term, decided by that socket's address when last seen.
    pub fn matches_listener_socket(&self, netns: u32, lport: u16, inode: u32) -> bool {
        if self.by_addr {
            self.shorthands_listener(netns, lport) && self.seen_sockets.get(&inode).copied().unwrap_or(false)
        } else {
            self.matches_listener(netns, lport)
        }
    }

    /// Listener views: an accept or listen event, whose local side is the listening socket; a
    /// match is remembered for its port and socket.
    pub fn matches_listen_event(&mut self, r: &Record) -> bool {
        if !self.shorthands_listener(r.netns, r.lport) {
            return false;
        }
        let ok = self.expr.as_ref().is_none_or(|e| e.matches(&Self::listener_subject(r.netns, r.laddr, r.lport)));
        if ok && self.by_addr {
            self.seen.insert((r.netns, r.lport), true);
            if let Some(inode) = r.inode {
                self.seen_sockets.insert(inode, true);
            }
        }
        ok
    }

    /// Listener views: keeps the sample's LISTEN sockets that match; a port in the sample is
    /// shown from now on when one of its sockets matched.
    pub fn select_listeners(&mut self, sample: &mut DiagSample) {
        if self.by_addr {
            for d in &sample.listeners {
                self.seen.insert((d.netns, d.lport), false);
            }
        }
        sample.listeners.retain(|d| {
            let ok = self.shorthands_listener(d.netns, d.lport)
                && self.expr.as_ref().is_none_or(|e| e.matches(&Self::listener_subject(d.netns, Some(d.laddr), d.lport)));
            if self.by_addr {
                if d.inode != 0 {
                    self.seen_sockets.insert(d.inode, ok);
                }
                if ok {
                    self.seen.insert((d.netns, d.lport), true);
                }
            }
            ok
        });
    }

    /// `watch`: an event, its local side against `sport`/`src`, its remote side against
    /// `dport`/`dst`.
    pub fn matches_event(&self, r: &Record) -> bool {
        self.port.is_none_or(|p| r.lport == p || r.rport == p)
            && self.pid.is_none_or(|p| r.pid == Some(p))
            && self.netns.is_none_or(|n| r.netns == n)
            && self.expr.as_ref().is_none_or(|e| {
                e.matches(&Subject {
                    netns: r.netns,
                    local: End { ip: r.laddr, port: r.lport },
                    peer: Some(End { ip: r.raddr, port: r.rport }),
                })
            })
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    fn p(s: &str) -> Expr {
        parse(&[s.to_owned()]).unwrap_or_else(|e| panic!("{s:?}: {e}")).expr.unwrap()
    }

    /// A socket with these ends in namespace 1.
    fn on(l: SocketAddr, r: SocketAddr) -> Subject {
        Subject { netns: 1, local: l.into(), peer: Some(r.into()) }
    }

    fn show(s: &str) -> String {
        p(s).to_string()
    }

    fn err(s: &str) -> FilterError {
        parse(&[s.to_owned()]).expect_err(s)
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn empty_is_no_filter() {
        assert_eq!(parse(&[]).unwrap(), Parsed::default());
        assert_eq!(parse(&["  ".into()]).unwrap(), Parsed::default());
    }

    #[test]
    fn precedence_not_and_or() {
        assert_eq!(
            show("sport = :1 or sport = :2 and not dport = :3"),
            "(sport = :1 or (sport = :2 and not dport = :3))"
        );
        assert_eq!(show("not sport = :1 and dport = :2"), "(not sport = :1 and dport = :2)");
        assert_eq!(show("sport = :1 and dport = :2 or dport = :3"), "((sport = :1 and dport = :2) or dport = :3)");
        // Left associative.
        assert_eq!(show("sport = :1 or sport = :2 or sport = :3"), "((sport = :1 or sport = :2) or sport = :3)");
        assert_eq!(show("! ! sport = :1"), "not not sport = :1");
    }

    #[test]
    fn parentheses_override_precedence() {
        assert_eq!(show("(sport = :1 or sport = :2) and dport = :3"), "((sport = :1 or sport = :2) and dport = :3)");
        assert_eq!(show("not (sport = :1 or sport = :2)"), "not (sport = :1 or sport = :2)");
        assert_eq!(show("((sport = :1))"), "sport = :1");
    }

    #[test]
    fn juxtaposition_is_and_and_symbols_work() {
        assert_eq!(show("sport = :1 dport = :2"), "(sport = :1 and dport = :2)");
        assert_eq!(show("sport=:1&&dport==:2||!(src 10.0.0.1)"), "((sport = :1 and dport = :2) or not src 10.0.0.1/32)");
        assert_eq!(show("(sport eq :1)|(dport neq :2)&src *:3"), "(sport = :1 or (dport != :2 and src *:3))");
    }

    #[test]
    fn arguments_are_joined() {
        let args: Vec<String> = ["sport", "=", ":80", "or", "(", "dport", ">=", "1024", ")"].iter().map(|s| (*s).to_owned()).collect();
        assert_eq!(parse(&args).unwrap().expr.unwrap().to_string(), "(sport = :80 or dport >= :1024)");
    }

    #[test]
    fn port_operators() {
        let l = sa("127.0.0.1:8080");
        let r = sa("127.0.0.1:40000");
        for (e, want) in [
            ("sport = :8080", true),
            ("sport == :8080", true),
            ("sport eq 8080", true),
            ("sport :8080", true),
            ("sport != :8080", false),
            ("sport neq :8080", false),
            ("sport < :8080", false),
            ("sport <= :8080", true),
            ("sport > :8079", true),
            ("sport >= :8081", false),
            ("sport lt :8081", true),
            ("sport ge :8080", true),
            ("dport > :32767", true),
            ("dport = :8080", false),
        ] {
            assert_eq!(p(e).matches(&on(l, r)), want, "{e}");
        }
    }

    #[test]
    fn host_conditions() {
        let l = sa("10.1.2.3:443");
        let r = sa("[2001:db8::7]:50000");
        for (e, want) in [
            ("src 10.1.2.3", true),
            ("src 10.0.0.0/8", true),
            ("src 10.0.0.0/8:443", true),
            ("src 10.0.0.0/8:444", false),
            ("src 10.1.2.3:443", true),
            ("src 11.0.0.0/8", false),
            ("src = 10.1.2.3", true),
            ("src != 10.1.2.3", false),
            ("src :443", true),
            ("src *:443", true),
            ("src *", true),
            ("src 0.0.0.0/0", true),
            ("dst [2001:db8::]/32", true),
            ("dst [2001:db8::/32]:50000", true),
            ("dst [2001:db8::/32]:1", false),
            ("dst 2001:db8::7", true),
            ("dst 2001:db9::/32", false),
            ("dst 10.0.0.0/8", false),
            ("dst [2001:db8::7]:50000", true),
        ] {
            assert_eq!(p(e).matches(&on(l, r)), want, "{e}");
        }
        // IPv4 networks match IPv4-mapped IPv6 addresses.
        let mapped = sa("[::ffff:192.168.1.5]:80");
        assert!(p("src 192.168.0.0/16").matches(&on(mapped, r)));
        assert!(!p("src 192.169.0.0/16").matches(&on(mapped, r)));
    }

    #[test]
    fn evaluation_follows_the_tree() {
        let l = sa("127.0.0.1:80");
        let r = sa("127.0.0.1:5000");
        assert!(p("sport = :81 or sport = :80 and dport = :5000").matches(&on(l, r)));
        assert!(!p("(sport = :81 or sport = :80) and dport = :5001").matches(&on(l, r)));
        assert!(p("not (sport = :81 or dport = :5001)").matches(&on(l, r)));
        assert!(!p("not sport = :80 or dport = :1").matches(&on(l, r)));
    }

    #[test]
    fn errors_name_the_problem_and_position() {
        assert_eq!(err("sport = :8080 )"), FilterError { pos: 15, message: "unbalanced \")\"".into() });
        assert_eq!(err("(sport = :1").message, "missing \")\" to close \"(\" at 1");
        assert_eq!(err("sport = :1 or").message, "expression ends where a condition was expected");
        assert_eq!(err("sport = http").message, "\"http\" is not a port (expected :N with N from 0 to 65535)");
        assert_eq!(err("sport = :70000").pos, 9);
        assert!(err("sport =").message.starts_with("expected a port after \"sport =\""));
        assert!(err("sport = (").message.contains("found \"(\""));
        assert!(err("foo = :1").message.starts_with("unknown term \"foo\""));
        assert_eq!(err("()").message, "empty parentheses");
        assert!(err("src < 10.0.0.1").message.contains("compares ports"));
        assert!(err("src 10.0.0.0/33").message.contains("prefix length"));
        assert!(err("src example.com").message.contains("not an IP address"));
        assert!(err("dst [::1").message.contains("missing \"]\""));
        assert!(err("sport = :1 and").message.contains("expression ends"));
        assert!(err("sport = :1 = :2").message.starts_with("unexpected \"=\""));
        assert!(err(")").message.contains("unexpected \")\""));
        let deep = format!("{}sport = :1{}", "(".repeat(500), ")".repeat(500));
        assert!(err(&deep).message.contains("nested too deeply"));
        let nots = format!("{}sport = :1", "not ".repeat(500));
        assert!(err(&nots).message.contains("nested too deeply"));
        // Every message is one line.
        for bad in ["(", "sport", "src [", "dst 1.2.3.4:x", "not", "sport > :1 or ) "] {
            assert!(!err(bad).to_string().contains('\n'), "{bad}");
        }
    }

    fn parsed(s: &str) -> Parsed {
        parse(&[s.to_owned()]).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    fn mask(names: &[TcpState]) -> u32 {
        names.iter().fold(0, |m, s| m | bit(*s))
    }

    #[test]
    fn state_clauses_follow_ss() {
        use TcpState::*;
        assert_eq!(parsed("state established").states, Some(States { mask: mask(&[Established]), pos: 1 }));
        assert_eq!(parsed("state established state time-wait").states.unwrap().mask, mask(&[Established, TimeWait]));
        // The first exclude starts from every state.
        assert_eq!(parsed("exclude listening").states.unwrap().mask, ALL_STATES & !mask(&[Listen]));
        assert_eq!(parsed("excl bucket").states.unwrap().mask, ALL_STATES & !mask(&[SynRecv, TimeWait]));
        // A state after an exclude adds back; an exclude after a state removes.
        assert_eq!(parsed("state connected exclude established").states.unwrap().mask, ALL_STATES & !mask(&[Close, Listen, Established]));
        assert_eq!(parsed("state synchronized").states.unwrap().mask, ALL_STATES & !mask(&[Close, Listen, SynSent]));
        assert_eq!(parsed("state big").states.unwrap().mask, ALL_STATES & !mask(&[SynRecv, TimeWait]));
        assert_eq!(parsed("state all").states.unwrap().mask, ALL_STATES);
        // ss's aliases and case-insensitivity.
        assert_eq!(parsed("state SYN-RCV state Closed").states.unwrap().mask, mask(&[SynRecv, Close]));
        assert_eq!(SS_CONNECTED, mask(&[Established, SynSent, FinWait1, FinWait2, CloseWait, LastAck, Closing]));
        // Then the expression.
        let args: Vec<String> = ["state", "established", "( dport = :443 or sport = :443 )"].map(String::from).to_vec();
        let p = parse(&args).unwrap();
        assert_eq!(p.states.unwrap().mask, mask(&[Established]));
        assert_eq!(p.expr.unwrap().to_string(), "(dport = :443 or sport = :443)");
        assert!(parsed("state time-wait").expr.is_none());
    }

    #[test]
    fn state_errors() {
        assert_eq!(err("state nonsense").pos, 7);
        assert!(err("state nonsense").message.starts_with("unknown state \"nonsense\" (expected established"));
        assert!(err("state").message.starts_with("expected a state after \"state\""));
        assert!(err("state (").message.contains("unknown state \"(\""));
        let e = err("sport = :1 state listening");
        assert_eq!(e.pos, 12);
        assert!(e.message.contains("comes before the expression"), "{e}");
    }

    #[test]
    fn netns_terms_are_resolved_and_matched() {
        let mut p = parsed("netns blue and sport = :80 or netns != 7");
        assert_eq!(p.expr.as_ref().unwrap().to_string(), "((netns blue and sport = :80) or not netns 7)");
        let mut asked = Vec::new();
        p.resolve_netns(|s| {
            asked.push(s.to_owned());
            Ok::<_, ()>(if s == "blue" { 5 } else { s.parse().unwrap() })
        })
        .unwrap();
        assert_eq!(asked, ["blue", "7"]);
        let e = p.expr.unwrap();
        let at = |netns, port| Subject { netns, local: End { ip: None, port }, peer: None };
        assert!(e.matches(&at(5, 80)));
        assert!(!e.matches(&at(7, 80)));
        assert!(e.matches(&at(9, 1)));
        assert!(err("netns").message.starts_with("expected a network namespace"));
        assert!(err("netns < 3").message.contains("netns takes ="));
        let mut q = parsed("netns nowhere");
        assert_eq!(q.resolve_netns(|_| Err::<u32, _>("unknown")), Err("unknown"));
    }

    #[test]
    fn required_port_and_netns_come_from_the_top_level_and_chain() {
        let f = |s: &str| {
            let mut q = parsed(s);
            q.resolve_netns(|n| Ok::<_, ()>(if n == "blue" { 5 } else { n.parse().unwrap() })).unwrap();
            Filter::new(None, None, None, q.expr)
        };
        let g = f("netns blue and sport = :8080");
        assert_eq!((g.local_port(), g.any_end_port(), g.required_netns()), (Some(8080), Some(8080), Some(5)));
        let g = f("src 10.0.0.1:443 and dport > :1000");
        assert_eq!((g.local_port(), g.any_end_port(), g.required_netns()), (Some(443), Some(443), None));
        let g = f("dport = :6379");
        assert_eq!((g.local_port(), g.any_end_port()), (None, Some(6379)));
        // Not required by every match: an `or`, a negation, an inequality.
        for s in ["sport = :1 or sport = :2", "not sport = :1", "sport >= :1024", "netns blue or sport = :1"] {
            let g = f(s);
            assert_eq!((g.local_port(), g.required_netns()), (None, None), "{s}");
        }
        assert_eq!(f("netns blue or sport = :1").any_end_port(), None);
        // The shorthands win.
        let g = Filter::new(Some(9), None, Some(3), f("netns blue and sport = :1").expr);
        assert_eq!((g.local_port(), g.any_end_port(), g.required_netns()), (Some(9), Some(9), Some(3)));
    }

    #[test]
    fn scopes_refuse_what_they_cannot_apply() {
        let ok = |s: &str, scope| parsed(s).check(scope, "top").unwrap_or_else(|e| panic!("{s}: {e}"));
        let bad = |s: &str, scope| parsed(s).check(scope, "top").expect_err(s);
        for s in ["sport = :80", "src 10.0.0.0/8 or sport > :1024", "state listening sport = :80", "exclude time-wait", "netns 3", "state all"] {
            ok(s, Scope::Listeners);
        }
        let e = bad("sport = :80 and dport = :1", Scope::Listeners);
        assert_eq!(e.pos, 17);
        assert!(e.message.starts_with("dport: top shows listeners"), "{e}");
        assert_eq!(bad("not (src 1.2.3.4 or dst 1.2.3.4)", Scope::Listeners).pos, 21);
        let e = bad("state established sport = :80", Scope::Listeners);
        assert_eq!(e.pos, 1);
        assert!(e.message.contains("leaves them out"), "{e}");
        assert!(bad("exclude listening", Scope::Listeners).message.contains("leaves them out"));
        for s in ["sport = :80 and dport = :1", "dst [::1] or src 10.0.0.1", "netns 1"] {
            ok(s, Scope::Events);
            ok(s, Scope::Sockets);
        }
        assert!(bad("state established", Scope::Events).message.contains("no socket state"));
        ok("state established dport = :443", Scope::Sockets);
    }

    fn rec(netns: u32, laddr: &str, lport: u16, raddr: &str, rport: u16, pid: Option<u32>) -> Record {
        Record {
            kind: "accept",
            ts_ns: 0,
            netns,
            pid,
            tid: pid,
            comm: None,
            family: None,
            laddr: Some(laddr.parse().unwrap()),
            lport,
            raddr: Some(raddr.parse().unwrap()),
            rport,
            queue_len: None,
            queue_max: None,
            accept_wait_ns: None,
            segs: 0,
            hook: "tracepoint",
            inode: None,
        }
    }

    #[test]
    fn events_match_both_ends_and_shorthands() {
        let f = Filter::new(None, None, None, Some(p("sport = :80 and dst 10.0.0.0/8")));
        assert!(f.matches_event(&rec(1, "127.0.0.1", 80, "10.1.1.1", 5000, None)));
        assert!(!f.matches_event(&rec(1, "127.0.0.1", 80, "11.1.1.1", 5000, None)));
        assert!(!f.matches_event(&rec(1, "127.0.0.1", 81, "10.1.1.1", 5000, None)));
        // Shorthands and the expression must all match.
        let f = Filter::new(Some(5000), Some(42), Some(1), Some(p("src 127.0.0.1")));
        assert!(f.matches_event(&rec(1, "127.0.0.1", 80, "10.1.1.1", 5000, Some(42))));
        assert!(!f.matches_event(&rec(1, "127.0.0.1", 80, "10.1.1.1", 5000, Some(43))));
        assert!(!f.matches_event(&rec(2, "127.0.0.1", 80, "10.1.1.1", 5000, Some(42))));
        assert!(!f.matches_event(&rec(1, "127.0.0.2", 80, "10.1.1.1", 5000, Some(42))));
        // An address the hook could not know matches no address condition.
        let mut r = rec(1, "127.0.0.1", 80, "10.1.1.1", 5000, None);
        r.raddr = None;
        assert!(!Filter::new(None, None, None, Some(p("dst 0.0.0.0/0"))).matches_event(&r));
        assert!(Filter::new(None, None, None, Some(p("dst *:5000"))).matches_event(&r));
    }

    #[test]
    fn listeners_by_port_socket_and_address() {
        use crate::model::DiagListener;
        let d = |netns, a: &str, lport| DiagListener {
            netns,
            laddr: a.parse().unwrap(),
            lport,
            queue_len: 0,
            backlog: 128,
            owners: Vec::new(),
            drops: None,
            inode: u32::from(lport) * 10 + u32::from(a.contains(':')),
            cookie: 0,
        };
        // Without an address, exact from (netns, port).
        let f = Filter::new(None, None, Some(1), Some(p("sport >= :8000 and not sport = :8081")));
        assert!(f.matches_listener(1, 8080));
        assert!(!f.matches_listener(1, 8081));
        assert!(!f.matches_listener(2, 8080));
        assert!(!f.matches_listener(1, 80));
        // With `src`: decided by the sockets seen on the port.
        let mut f = Filter::new(None, None, None, Some(p("src 127.0.0.0/8")));
        assert!(!f.matches_listener(1, 80), "not seen yet: not shown");
        let mut sample = DiagSample { listeners: vec![d(1, "127.0.0.1", 80), d(1, "::", 80), d(1, "10.0.0.1", 90)], ..DiagSample::default() };
        f.select_listeners(&mut sample);
        assert_eq!(sample.listeners, vec![d(1, "127.0.0.1", 80)]);
        assert!(f.matches_listener(1, 80));
        assert!(!f.matches_listener(1, 90));
        // Per socket: the v4 one matched, the v6 one on the same port did not.
        assert!(f.matches_listener_socket(1, 80, 800));
        assert!(!f.matches_listener_socket(1, 80, 801));
        assert!(!f.matches_listener_socket(1, 80, 12345), "a socket not seen yet");
        // An accept on a matching listener address admits its port and socket until a sample
        // says otherwise.
        let mut ev = rec(1, "127.0.0.5", 90, "127.0.0.9", 5000, None);
        ev.inode = Some(901);
        assert!(f.matches_listen_event(&ev));
        assert!(f.matches_listener(1, 90) && f.matches_listener_socket(1, 90, 901));
        assert!(!f.matches_listen_event(&rec(1, "10.0.0.1", 91, "127.0.0.9", 5000, None)));
        assert!(!f.matches_listener(1, 91));
        let mut sample = DiagSample { listeners: vec![d(1, "10.0.0.1", 90)], ..DiagSample::default() };
        f.select_listeners(&mut sample);
        assert!(sample.listeners.is_empty());
        assert!(!f.matches_listener(1, 90));
        assert!(f.matches_listener(1, 80), "a port absent from the sample keeps its verdict");
    }
}
