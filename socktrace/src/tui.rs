//! Terminal UI of `top` (ratatui): the listener table, rows whose queue hit the backlog in red,
//! a sparkline of the selected listener's queue peaks. Keys: q/Esc quit, s cycles the sort
//! column, ↑/↓ select.

use std::time::Duration;

use ratatui::{
    crossterm::event::{self, Event, KeyCode, KeyEventKind},
    layout::{Constraint, Layout},
    style::{Color, Modifier, Style},
    widgets::{Block, Cell, Paragraph, Row as TRow, Sparkline, Table, TableState},
};
use tokio::signal::unix::SignalKind;

use crate::{
    agent::Agent,
    cli::SortKey,
    top::{HEADER, TopOptions, lines, sorted_rows},
};

const SORTS: [SortKey; 5] = [SortKey::Drops, SortKey::Queue, SortKey::Wait, SortKey::Accepts, SortKey::Port];

pub async fn run(mut agent: Agent, mut opts: TopOptions) -> anyhow::Result<()> {
    let mut terminal = ratatui::init();
    let result = ui_loop(&mut agent, &mut opts, &mut terminal).await;
    ratatui::restore();
    result
}

async fn ui_loop(agent: &mut Agent, opts: &mut TopOptions, terminal: &mut ratatui::DefaultTerminal) -> anyhow::Result<()> {
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut ticker = tokio::time::interval(opts.interval);
    ticker.tick().await;
    let mut keys = tokio::time::interval(Duration::from_millis(100));
    let mut state = TableState::default().with_selected(Some(0));
    let mut done = 0u64;
    loop {
        tokio::select! {
            r = agent.pump() => r?,
            _ = ticker.tick() => {
                agent.close_interval()?;
                done += 1;
                if opts.iterations.is_some_and(|n| done >= n) {
                    return Ok(());
                }
            }
            _ = keys.tick() => {
                while event::poll(Duration::ZERO)? {
                    if let Event::Key(k) = event::read()? {
                        if k.kind != KeyEventKind::Press {
                            continue;
                        }
                        match k.code {
                            KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                            KeyCode::Char('c') if k.modifiers.contains(ratatui::crossterm::event::KeyModifiers::CONTROL) => return Ok(()),
                            KeyCode::Char('s') => {
                                let i = SORTS.iter().position(|s| *s == opts.sort).unwrap_or(0);
                                opts.sort = SORTS[(i + 1) % SORTS.len()];
                            }
                            KeyCode::Down => state.select_next(),
                            KeyCode::Up => state.select_previous(),
                            _ => {}
                        }
                    }
                }
            }
            _ = sigterm.recv() => return Ok(()),
        }
        draw(terminal, agent, opts, &mut state)?;
    }
}

fn draw(terminal: &mut ratatui::DefaultTerminal, agent: &Agent, opts: &TopOptions, state: &mut TableState) -> anyhow::Result<()> {
    let rows = sorted_rows(agent, opts.sort);
    let secs = opts.interval.as_secs_f64();
    // A port's group row, then its sockets' rows (several LISTEN sockets on one port).
    let flat: Vec<(usize, [String; 13], bool)> = rows
        .iter()
        .enumerate()
        .flat_map(|(g, (r, hot, _))| lines(r, secs).into_iter().enumerate().map(move |(i, (c, h))| (g, c, if i == 0 { *hot } else { h })))
        .collect();
    let selected = flat.get(state.selected().unwrap_or(0).min(flat.len().saturating_sub(1))).map_or(0, |f| f.0);
    terminal.draw(|f| {
        let [title, table_area, spark_area] =
            Layout::vertical([Constraint::Length(1), Constraint::Min(3), Constraint::Length(5)]).areas(f.area());
        f.render_widget(
            Paragraph::new(format!(
                "socktrace top — {} listeners, interval {:.1}s, sort: {:?} (s), lost events: {}{}{}{}   q: quit",
                rows.len(),
                secs,
                opts.sort,
                agent.lost(),
                if agent.diag_ok { "" } else { ", sock_diag unavailable" },
                agent.pressure_note(),
                agent.missed_note()
            )),
            title,
        );
        let header = TRow::new(HEADER.iter().map(|h| Cell::from(*h))).style(Style::new().add_modifier(Modifier::BOLD));
        let body = flat.iter().map(|(_, c, hot)| {
            let row = TRow::new(c.iter().map(|x| Cell::from(x.as_str())));
            if *hot { row.style(Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)) } else { row }
        });
        let widths = [10, 24, 18, 6, 6, 8, 7, 10, 10, 10, 10, 14, 11].map(Constraint::Length);
        let table = Table::new(body, widths)
            .header(header)
            .block(Block::bordered().title("listeners (red: queue hit its backlog / drops)"))
            .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED));
        f.render_stateful_widget(table, table_area, state);
        let (label, data) = rows.get(selected).map_or((String::from("-"), Vec::new()), |(r, _, h)| {
            (format!("queue peak per interval, port {} netns {}", r.lport, r.netns), h.iter().map(|v| u64::from(*v)).collect())
        });
        f.render_widget(Sparkline::default().block(Block::bordered().title(label)).data(&data), spark_area);
    })?;
    Ok(())
}
