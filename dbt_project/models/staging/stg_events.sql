{#- One row per distinct event (raw.events deduplicated by event_id), typed and with normalised text.

    Performance notes (this view feeds every build; the benchmark runs it over 10M events):
    * every string operation happens before the window (DuckDB prunes the columns later models do not use, so
      the window carries only what they read); PII masking reads the text column directly (see normalised);
    * one window, ordered like the sessions of int_sessions (macro event_order: event_ts, then search before other
      types at equal timestamps, then event_id), both deduplicates and gives previous_event_ts,
      so the whole staging -> sessions -> memories build sorts the events twice, not three times;
    * the window is partitioned by (source, user_id, event_date): a filter on event_date (incremental builds)
      is pushed below it to the scan of raw.events. -#}

with source as (

    select * from {{ source('raw', 'events') }}

),

normalised as (

    select
        event_id,
        user_id,
        source,
        event_ts,
        cast(event_ts as date) as event_date,
        lower(trim(event_type)) as event_type,
        nullif(trim(item_id), '') as item_id,
        {{ normalise_text('text') }} as text_normalised,
        -- masked straight from the column: on dictionary-encoded text DuckDB then runs the regular expressions
        -- once per distinct value (applied after a CASE they would run once per row)
        nullif({{ mask_pii(normalise_text('text')) }}, '') as text_normalised_masked,
        -- one JSON parse per row for every attribute we read
        case
            when attributes is not null
                then json_extract_string(attributes, ['$.url', '$.rating', '$.genres', '$.tag', '$.title'])
        end as attrs,
        batch_id,
        ingested_at
    from source

),

typed as (

    select
        event_id,
        user_id,
        source,
        event_ts,
        event_date,
        event_type,
        -- tie-break of equal timestamps in every ordering of events (macro event_order_rank: search = 0, else 1)
        {{ event_order_rank('event_type') }} as event_order_rank,
        item_id,
        -- search queries are case-insensitive: lower-case them; titles and names keep their case
        case when event_type = 'search' then lower(text_normalised) else text_normalised end as text,
        case when event_type = 'search' then lower(text_normalised_masked) else text_normalised_masked end
            as text_masked,
        {{ normalise_text('attrs[1]') }} as url,
        try_cast(attrs[2] as double) as rating,
        -- genres: a JSON list (MovieLens loader) or a 'A|B' string; shown as 'A|B'
        {{ normalise_text("case when attrs[3] like '[%' then array_to_string(try_cast(attrs[3] as varchar[]), '|') else attrs[3] end") }}
            as genres,
        {{ normalise_text('attrs[4]') }} as tag,
        {{ normalise_text('attrs[5]') }} as title,
        batch_id,
        ingested_at
    from normalised

),

labelled as (

    select
        *,
        {{ url_domain('url') }} as url_domain,
        -- what the action was about, as a reader would name it, PII-masked: the query of a search, the site of
        -- a click, else the item (title, else text, else id); a tag event whose text is the tag uses the title.
        -- Titles come from catalogues (movies.csv, item names), not from users: they are not masked.
        case event_type
            when 'search' then coalesce(text_masked, title, item_id)
            when 'click' then coalesce({{ url_domain('url') }}, title, text_masked, item_id)
            when 'tag' then coalesce(title, case when tag is not null then text_masked end, item_id)
            else coalesce(title, text_masked, item_id)
        end as subject
    from typed

),

described as (

    select
        *,
        -- one short part of intent_memories.memory_text per action (rules in dbt_project/README.md);
        -- (the free text in it is PII-masked: text_masked, and the tag)
        case event_type
            when 'search' then 'searched: '
            when 'click' then 'clicked: '
            when 'view' then 'viewed: '
            when 'like' then 'liked: '
            when 'cart' then 'added to cart: '
            when 'offer' then 'offered: '
            when 'checkout' then 'checked out: '
            when 'purchase' then 'purchased: '
            when 'rating' then 'rated ' || coalesce(cast(rating as varchar), '?') || ': '
            when 'tag' then 'tagged ''' || coalesce({{ mask_pii('coalesce(tag, text)') }}, '?') || ''': '
            else event_type || ': '
        end
        || coalesce(subject, '?')
        || case when event_type = 'rating' then coalesce(' [' || genres || ']', '') else '' end
            as action_text,
        -- what the action was about in the user's or the catalogue's own words, without the template verb, the
        -- rating value or a clicked site: the part of intent_memories.embedding_text (the text that is embedded).
        -- NULL for clicks (the site is a destination, not an intent; measured in docs/results.md) and for actions
        -- with no text. PII-masked like action_text.
        case event_type
            when 'search' then coalesce(text_masked, title)
            when 'click' then null
            when 'rating' then coalesce(title, text_masked) || coalesce(' [' || genres || ']', '')
            when 'tag' then coalesce({{ mask_pii('coalesce(tag, text)') }} || ': ', '') || coalesce(title, '')
            else coalesce(title, text_masked)
        end as content_text
    from labelled

),

deduplicated as (

    -- Duplicates (same event_id: same source, user, time and content, hence the same rank) are adjacent in a
    -- user's day ordered by event_order() = (event_ts, event_order_rank, event_id); the first ingested copy is
    -- kept. The same ordered window gives every event its predecessor's timestamp, which int_sessions needs: one
    -- sort of the events serves both.
    select
        *,
        lag(event_id) over user_day as previous_event_id,
        lag(event_ts) over user_day as previous_event_ts
    from described
    window user_day as (
        partition by source, user_id, event_date
        order by {{ event_order() }}, ingested_at, batch_id
    )

)

select
    event_id,
    user_id,
    source,
    event_ts,
    event_date,
    event_type,
    event_order_rank,
    item_id,
    text,
    text_masked,
    url,
    url_domain,
    rating,
    genres,
    case when event_type = 'tag' then {{ mask_pii('coalesce(tag, text)') }} end as tag,
    title,
    action_text,
    nullif(trim(content_text), '') as content_text,
    previous_event_ts,
    batch_id,
    ingested_at
from deduplicated
where previous_event_id is distinct from event_id
