"""Loader for MovieLens (``--format movielens``): ``ratings.csv`` and ``tags.csv``, titles from ``movies.csv``.

Files are recognised by their header, not their name: ``userId,movieId,rating,timestamp`` (ratings),
``userId,movieId,tag,timestamp`` (tags), ``movieId,title,genres`` (movies; a lookup, not events).
``links.csv`` is ignored. A folder stands for the ratings.csv, tags.csv and movies.csv in it. The movies file
is the one named on the command line, else the ``movies.csv`` next to each ratings/tags file (required).
Plain or gzip; CSV quoting as in RFC 4180 within a line (titles hold quoted commas).

Each ratings / tags file is one batch (its sha256 is the ledger key; movies.csv only provides titles).
Mapping (movie text = ``Title (year) [Genre|Genre]``, just the title for ``(no genres listed)``):

* ``rating``: user_id = userId, event_ts = timestamp (epoch seconds, UTC), item_id = movieId,
  text = movie text, attributes ``{"rating": 4.5, "title": ..., "genres": [...]}``.
* ``tag``: text = ``<tag> — <movie text>`` (the tag first: it is what the user wrote), item_id = movieId,
  attributes ``{"tag": ..., "title": ..., "genres": [...]}``.

A movieId absent from movies.csv is accepted with no title (text = the tag alone for tags, NULL for ratings).
Rejected rows: malformed CSV line, invalid UTF-8, missing userId, missing/unparseable/out-of-range timestamp,
missing movieId, rating not a number or outside 0.5-5, empty tag.
"""

from __future__ import annotations

import logging
from pathlib import Path

import duckdb

from persona_tasks.errors import InputFileError
from persona_tasks.ingest.common import (
    Job,
    Stage,
    delimited_sql,
    epoch_sql,
    header_fields,
    probe_text,
    read_text,
    register_lines,
    text_lines,
)

log = logging.getLogger("persona_tasks.ingest")

HEADERS = {
    "ratings": ["userId", "movieId", "rating", "timestamp"],
    "tags": ["userId", "movieId", "tag", "timestamp"],
    "movies": ["movieId", "title", "genres"],
    "links": ["movieId", "imdbId", "tmdbId"],
}
FOLDER_FILES = ("ratings", "tags", "movies")
WHAT = "MovieLens"


def _kind(first_line: str) -> str | None:
    found = [c.lower() for c in header_fields(first_line, ",")]
    for kind, cols in HEADERS.items():
        if found == [c.lower() for c in cols]:
            return kind
    return None


def _in_folder(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.csv", f"{stem}.csv.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


class MovieLensLoader:
    fmt = "movielens"

    def __init__(self) -> None:
        self._movies_tables: dict[Path, str] = {}

    def plan(self, paths: list[Path]) -> list[Job]:
        named: list[tuple[Path, str]] = []
        for p in paths:
            if p.is_dir():
                found = [(f, str(f)) for stem in FOLDER_FILES if (f := _in_folder(p, stem))]
                if not any(f.name.startswith(("ratings", "tags")) for f, _ in found):
                    raise InputFileError(p, "folder holds no MovieLens ratings.csv or tags.csv")
                named += found
            else:
                named.append((p, str(p)))
        events: list[Job] = []
        movies: Path | None = None
        for path, display in named:
            kind = _kind(probe_text(path, display))
            if kind is None:
                raise InputFileError(
                    display,
                    "not a MovieLens file: the header must be one of "
                    + "; ".join(",".join(cols) for k, cols in HEADERS.items() if k != "links"),
                )
            if kind == "links":
                log.info("%s: MovieLens links file holds no user actions: ignored", display)
            elif kind == "movies":
                movies = movies or path
            else:
                events.append(Job(path=path, display=display, kind=kind))
        if not events:
            raise InputFileError(named[0][1] if named else "(no paths)", "no MovieLens ratings or tags file given")
        for job in events:
            m = movies or _in_folder(job.path.parent, "movies")
            if m is None:
                raise InputFileError(job.display, "movies.csv not found next to it: name the movies file too")
            if m != movies:
                probe = _kind(probe_text(m, str(m)))
                if probe != "movies":
                    raise InputFileError(m, "not a MovieLens movies file (header movieId,title,genres)")
            job.context["movies"] = m
        return events

    def _movies(self, con: duckdb.DuckDBPyConnection, path: Path) -> str:
        """Load a movies file once per run into a temp table (movieId, title, genres); return its name."""
        if path in self._movies_tables:
            return self._movies_tables[path]
        name = f"_ingest_movies_{len(self._movies_tables)}"
        con.register("_ingest_movie_lines", text_lines(read_text(path, str(path))))
        try:
            parsed = delimited_sql("_ingest_movie_lines", HEADERS["movies"], ",")
            con.execute(f"""
                CREATE OR REPLACE TEMP TABLE {name} AS
                SELECT movieId, arg_min(title, line) AS title, arg_min(genres, line) AS genres
                FROM (SELECT line, nullif(trim(c1), '') AS movieId, nullif(trim(c2), '') AS title,
                             nullif(trim(c3), '') AS genres
                      FROM ({parsed}) WHERE pre_reason IS NULL)
                WHERE movieId IS NOT NULL
                GROUP BY movieId
            """)
            bad = con.execute(
                f"SELECT count(*) FILTER (WHERE pre_reason IS NOT NULL) FROM ({parsed})"
            ).fetchall()[0][0]
        finally:
            con.unregister("_ingest_movie_lines")
        if bad:
            log.warning("%s: %d malformed movies lines ignored (their movies get no title)", path, bad)
        self._movies_tables[path] = name
        return name

    def stage(self, con: duckdb.DuckDBPyConnection, job: Job) -> Stage:
        movies = self._movies(con, job.context["movies"])
        register_lines(con, "_ingest_lines", read_text(job.path, job.display))
        cols = HEADERS[job.kind]
        parsed = delimited_sql("_ingest_lines", cols, ",")
        movie_text = (
            "CASE WHEN m.title IS NULL THEN NULL "
            "WHEN m.genres IS NULL OR m.genres = '(no genres listed)' THEN m.title "
            "ELSE m.title || ' [' || m.genres || ']' END"
        )
        genres = (
            "CASE WHEN m.genres IS NULL OR m.genres = '(no genres listed)' THEN CAST([] AS VARCHAR[]) "
            "ELSE string_split(m.genres, '|') END"
        )
        if job.kind == "ratings":
            event_type = "'rating'"
            text = movie_text
            attributes = f"json_object('rating', rating, 'title', m.title, 'genres', {genres})"
            value = "try_cast(trim(p.c3) AS DOUBLE) AS rating"
            post = [
                ("movieId", "p.movie_id IS NULL", "missing movie id"),
                ("rating", "nullif(trim(p.c3), '') IS NULL", "missing rating"),
                ("rating", "rating IS NULL", "rating is not a number"),
                ("rating", "NOT (rating >= 0.5 AND rating <= 5)", "rating outside 0.5-5"),
            ]
        else:
            event_type = "'tag'"
            text = f"CASE WHEN m.title IS NULL THEN tag ELSE tag || ' — ' || ({movie_text}) END"
            attributes = f"json_object('tag', tag, 'title', m.title, 'genres', {genres})"
            value = "nullif(trim(p.c3), '') AS tag"
            post = [
                ("movieId", "p.movie_id IS NULL", "missing movie id"),
                ("tag", "tag IS NULL", "missing tag"),
            ]
        post_field = "CASE " + " ".join(f"WHEN {cond} THEN '{f}'" for f, cond, _ in post) + " END"
        post_reason = "CASE " + " ".join(f"WHEN {cond} THEN '{r}'" for _, cond, r in post) + " END"
        sql = f"""
            SELECT line, src, pre_field, pre_reason, user_id, ts_raw,
                {epoch_sql("try_cast(ts_raw AS DOUBLE)", "epoch_s")} AS event_ts,
                {event_type} AS event_type, movie_id AS item_id, {text} AS text, {attributes} AS attributes,
                {post_field} AS post_field, {post_reason} AS post_reason
            FROM (
                SELECT p.*, nullif(trim(p.c1), '') AS user_id, nullif(trim(p.c4), '') AS ts_raw,
                       nullif(trim(p.c2), '') AS movie_id, {value}
                FROM ({parsed}) AS p
            ) AS p
            LEFT JOIN {movies} AS m ON m.movieId = p.movie_id
        """
        return Stage(
            sql=sql,
            fields={"user_id": "userId", "event_ts": "timestamp", "event_type": "rating" if job.kind == "ratings"
                    else "tag"},
            registered=["_ingest_lines"],
        )
