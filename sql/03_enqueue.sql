-- =============================================================================
-- pgqueue: enqueue
-- One code path creates jobs: enqueue(), enqueue_many() and the children made
-- by complete() all go through _insert_specs(), so validation, dedup,
-- dependencies and pipeline ids behave the same everywhere, and a fan-out is
-- one INSERT (one notification per queue).
-- =============================================================================

-- Advisory lock namespaces (two-int4 keys never collide with an application's
-- single-bigint advisory locks).
CREATE FUNCTION pgqueue._lock_class(p_kind text) RETURNS int
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE p_kind WHEN 'scope' THEN 7216001 WHEN 'dedup' THEN 7216002 WHEN 'leader' THEN 7216003
                       WHEN 'pipeline' THEN 7216004 WHEN 'waiters' THEN 7216005 WHEN 'scope_order' THEN 7216006
                       WHEN 'abort' THEN 7216007
                       WHEN 'pause' THEN 7216008 WHEN 'limit' THEN 7216009
                       WHEN 'limits' THEN 7216010 END
$$;

-- jsonb_hash agrees with JSONB equality (key order, 1 vs 1.0), as the unique
-- indexes do; hashing the text form would give one scope two locks.
CREATE FUNCTION pgqueue._scope_lock_key(p_scope jsonb) RETURNS int
LANGUAGE sql IMMUTABLE AS $$ SELECT jsonb_hash(p_scope) $$;

-- The keys a job spec may carry: enqueue's parameter names plus key/after.
CREATE FUNCTION pgqueue._spec_keys() RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['job_type', 'payload', 'queue', 'scope', 'dedup_key', 'run_after', 'priority', 'max_attempts',
                 'pipeline_id', 'next_jobs', 'depends_on', 'key', 'after']
$$;

-- What is wrong with one job spec, or NULL. A single expression with no
-- subqueries, so PostgreSQL inlines it into the calling query: validating ten
-- thousand specs costs one scan, not ten thousand function calls.
CREATE FUNCTION pgqueue._spec_problem(s jsonb) RETURNS text
LANGUAGE sql STABLE AS $$
SELECT CASE
    WHEN jsonb_typeof(s) IS DISTINCT FROM 'object' THEN
        format('must be a JSON object, got %s', coalesce(jsonb_typeof(s), 'NULL'))
    -- The common bulk spec (job_type, payload, queue, max_attempts: what
    -- App.with_defaults fills in for a registered type; key for a fan-out's
    -- children) is settled in a handful of operations; every other spec goes
    -- through the checks below one by one.
    WHEN s - ARRAY['job_type', 'payload', 'queue', 'key', 'max_attempts'] = '{}'
         AND jsonb_typeof(s->'job_type') = 'string' AND btrim(s->>'job_type', E' \t\n\r\f\x0B') <> ''
         AND coalesce(jsonb_typeof(s->'payload'), 'null') IN ('object', 'null')
         AND (coalesce(jsonb_typeof(s->'queue'), 'null') = 'null'
              OR (jsonb_typeof(s->'queue') = 'string' AND btrim(s->>'queue', E' \t\n\r\f\x0B') <> ''
                  AND octet_length(s->>'queue') <= 200))
         AND (coalesce(jsonb_typeof(s->'key'), 'null') = 'null'
              OR (jsonb_typeof(s->'key') = 'string' AND s->>'key' <> ''))
         -- An integer in range: a JSON number between 1 and 2^31-1 (compared as jsonb,
         -- no cast) whose text has no decimal point (numeric output never uses an
         -- exponent); 3.0 takes the slow path, which accepts it.
         AND (coalesce(jsonb_typeof(s->'max_attempts'), 'null') = 'null'
              OR (jsonb_typeof(s->'max_attempts') = 'number'
                  AND s->'max_attempts' >= '1' AND s->'max_attempts' <= '2147483647'
                  AND strpos(s->>'max_attempts', '.') = 0)) THEN
        NULL
    -- jsonb minus text[] drops the known keys in C; anything left is unknown.
    WHEN s - pgqueue._spec_keys() <> '{}' THEN
        format('unknown key(s) %s; allowed: %s',
               btrim(jsonb_path_query_array(s - pgqueue._spec_keys(), '$.keyvalue().key')::text, '[]'),
               array_to_string(pgqueue._spec_keys(), ', '))
    WHEN coalesce(s->'job_type', 'null') = 'null' THEN 'job_type is required'
    WHEN jsonb_typeof(s->'job_type') <> 'string' OR btrim(s->>'job_type', E' \t\n\r\f\x0B') = '' THEN
        'job_type must be a non-blank string'
    WHEN coalesce(s->'payload', 'null') <> 'null' AND jsonb_typeof(s->'payload') <> 'object' THEN
        format('payload must be a JSON object, got %s', jsonb_typeof(s->'payload'))
    WHEN coalesce(s->'queue', 'null') <> 'null'
         AND (jsonb_typeof(s->'queue') <> 'string' OR btrim(s->>'queue', E' \t\n\r\f\x0B') = ''
              OR octet_length(s->>'queue') > 200) THEN
        'queue must be a non-blank string of at most 200 bytes'
    WHEN coalesce(s->'dedup_key', 'null') <> 'null'
         AND (jsonb_typeof(s->'dedup_key') <> 'string' OR btrim(s->>'dedup_key', E' \t\n\r\f\x0B') = ''
              OR octet_length(s->>'dedup_key') > 1000) THEN
        'dedup_key must be a non-blank string of at most 1000 bytes'
    WHEN octet_length((s->'scope')::text) > 1000 THEN 'scope must be at most 1000 bytes of JSON'
    WHEN coalesce(s->'priority', 'null') <> 'null'
         AND (jsonb_typeof(s->'priority') <> 'number'
              OR (s->>'priority')::numeric <> trunc((s->>'priority')::numeric)
              OR (s->>'priority')::numeric NOT BETWEEN -2147483648 AND 2147483647) THEN
        'priority must be an integer from -2147483648 to 2147483647'
    WHEN coalesce(s->'max_attempts', 'null') <> 'null'
         AND (jsonb_typeof(s->'max_attempts') <> 'number'
              OR (s->>'max_attempts')::numeric <> trunc((s->>'max_attempts')::numeric)
              OR (s->>'max_attempts')::numeric < 1
              OR (s->>'max_attempts')::numeric > 2147483647) THEN
        format('max_attempts must be an integer >= 1, got %s', s->'max_attempts')
    WHEN coalesce(s->'run_after', 'null') <> 'null' AND jsonb_typeof(s->'run_after') <> 'string' THEN
        'run_after must be a timestamp string'
    WHEN coalesce(s->'pipeline_id', 'null') <> 'null'
         AND (jsonb_typeof(s->'pipeline_id') <> 'string'
              -- uuid's input syntax: braces around all of it or none, a hyphen after any
              -- group of four digits (what fails the cast fails here, with the key named).
              OR s->>'pipeline_id' !~* '^([0-9a-f]{4}(-?[0-9a-f]{4}){7}|\{[0-9a-f]{4}(-?[0-9a-f]{4}){7}\})$') THEN
        'pipeline_id must be a UUID string'
    WHEN coalesce(s->'next_jobs', 'null') <> 'null' AND jsonb_typeof(s->'next_jobs') <> 'array' THEN
        'next_jobs must be an array of job specs'
    WHEN coalesce(s->'depends_on', 'null') <> 'null'
         AND (jsonb_typeof(s->'depends_on') <> 'array'
              OR jsonb_path_exists(s, 'strict $.depends_on[*] ? (@.type() != "number" || @ < 0 || @ != @.floor()
                                                              || @ > 9223372036854775807)')) THEN
        'depends_on must be an array of job ids'
    WHEN coalesce(s->'key', 'null') <> 'null'
         AND (jsonb_typeof(s->'key') <> 'string' OR s->>'key' = '') THEN
        'key must be a non-empty string'
    WHEN coalesce(s->'after', 'null') <> 'null'
         AND (jsonb_typeof(s->'after') <> 'array'
              OR jsonb_path_exists(s, 'strict $.after[*] ? (@.type() != "string")')) THEN
        'after must be an array of sibling keys'
END
$$;

-- "label[i]" for a spec in an array, or just "label" for enqueue's single spec.
-- p_stored: a completion validates the specs stored in the job's next_jobs
-- followed by those passed to it, as one array; a passed spec is named by its
-- place in the caller's array, a stored one as stored.
CREATE FUNCTION pgqueue._spec_where(p_label text, p_ord bigint, p_single boolean, p_stored int DEFAULT 0)
RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_single THEN p_label
                WHEN p_ord <= p_stored THEN format('%s[%s] (stored in the job''s next_jobs)', p_label, p_ord - 1)
                ELSE format('%s[%s]', p_label, p_ord - p_stored - 1) END
$$;

-- next_jobs nested more than 100 deep are refused before _check_specs recurses into
-- them: past some 380 levels its recursion ended in "stack depth limit exceeded" (a
-- scale review), which names neither the spec nor the cause. Measured level by level.
CREATE FUNCTION pgqueue._check_spec_depth(p_specs jsonb, p_label text, p_levels int DEFAULT 100)
RETURNS void
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_level jsonb := p_specs;
BEGIN
    IF jsonb_typeof(p_specs) <> 'array' OR NOT p_specs @? '$[*].next_jobs[*]' THEN
        RETURN;
    END IF;
    FOR v_depth IN 1 .. p_levels LOOP
        v_level := (SELECT jsonb_agg(n.s)
                    FROM jsonb_array_elements(v_level) e(s)
                    CROSS JOIN LATERAL jsonb_array_elements(e.s->'next_jobs') n(s)
                    WHERE jsonb_typeof(e.s) = 'object' AND jsonb_typeof(e.s->'next_jobs') = 'array');
        EXIT WHEN v_level IS NULL;
    END LOOP;
    IF v_level IS NOT NULL THEN
        RAISE EXCEPTION '%: specs nested more than 100 levels deep in next_jobs; enqueue a long chain as one '
                        'pipeline of specs with key/after instead (enqueue_many, pgqueue.Pipeline)', p_label
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;

-- Validate the next_jobs arrays inside specs (recursion of _check_specs).
CREATE FUNCTION pgqueue._check_nested_specs(p_specs jsonb, p_label text, p_single boolean, p_stored int DEFAULT 0)
RETURNS void
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_ord bigint;
    v_spec jsonb;
BEGIN
    IF NOT p_specs @? '$[*].next_jobs' THEN
        RETURN;
    END IF;
    FOR v_ord, v_spec IN
        SELECT e.ord, e.s FROM jsonb_array_elements(p_specs) WITH ORDINALITY AS e(s, ord)
        WHERE jsonb_typeof(e.s->'next_jobs') = 'array'
    LOOP
        PERFORM pgqueue._check_specs(v_spec->'next_jobs',
                                     pgqueue._spec_where(p_label, v_ord, p_single, p_stored) || ': next_jobs');
    END LOOP;
END
$$;

-- Children inherit their parent's pipeline_id (a parent without one gets a new
-- one when it creates them), so a spec stored in next_jobs that names another
-- pipeline could never be created: its parent's completion would be refused
-- every time. Checked when the specs are stored, at every depth, against the
-- pipeline the children will have (NULL: unknown yet, so none may be named).
CREATE FUNCTION pgqueue._check_child_pipelines(p_specs jsonb, p_pipeline uuid, p_label text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_ord bigint;
    v_spec jsonb;
BEGIN
    FOR v_ord, v_spec IN SELECT e.ord, e.s FROM jsonb_array_elements(p_specs) WITH ORDINALITY AS e(s, ord) LOOP
        IF coalesce(v_spec->'pipeline_id', 'null') <> 'null'
           AND (v_spec->>'pipeline_id')::uuid IS DISTINCT FROM p_pipeline THEN
            RAISE EXCEPTION '%[%]: pipeline_id differs from the parent''s; children inherit it (a parent without one gets a new one)',
                p_label, v_ord - 1
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF jsonb_typeof(v_spec->'next_jobs') = 'array' THEN
            PERFORM pgqueue._check_child_pipelines(v_spec->'next_jobs', p_pipeline,
                                                   format('%s[%s]: next_jobs', p_label, v_ord - 1));
        END IF;
    END LOOP;
END
$$;

-- Stored specs (a job's next_jobs, at every depth) are created only when their
-- parent succeeds, maybe days later: a depends_on id among them must name a job
-- that exists when they are stored, or the mistake would surface only then.
-- (What becomes of a dependency meanwhile, failed, cancelled or pruned, is the
-- completion's to handle: see _insert_specs.) p_specs is an array of stored
-- specs; labels name the spec as _check_specs does.
CREATE FUNCTION pgqueue._check_stored_dependencies(p_specs jsonb, p_label text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_bad record;
BEGIN
    IF NOT p_specs @? 'lax $.**.depends_on' THEN
        RETURN;
    END IF;
    WITH RECURSIVE stored(s, label) AS (
        SELECT e.s, format('%s[%s]', p_label, e.ord - 1)
        FROM jsonb_array_elements(p_specs) WITH ORDINALITY AS e(s, ord)
        UNION ALL
        SELECT c.s, format('%s: next_jobs[%s]', st.label, c.ord - 1)
        FROM stored st,
             jsonb_array_elements(CASE WHEN jsonb_typeof(st.s->'next_jobs') = 'array' THEN st.s->'next_jobs'
                                       ELSE '[]' END) WITH ORDINALITY AS c(s, ord)
    )
    SELECT st.label, d.id INTO v_bad
    FROM stored st
    CROSS JOIN LATERAL (SELECT (x #>> '{}')::numeric::bigint AS id
                        FROM jsonb_path_query(st.s, 'lax $.depends_on[*] ? (@.type() == "number" && @ >= 0
                                                      && @ <= 9223372036854775807 && @ == @.floor())') x) d
    WHERE NOT EXISTS (SELECT 1 FROM pgqueue.jobs j WHERE j.id = d.id)
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION '%: depends_on names unknown job id %', v_bad.label, v_bad.id
            USING ERRCODE = 'foreign_key_violation';
    END IF;
END
$$;

-- Raise if the "after" lists of keyed specs form a cycle (every job on it would
-- wait forever). Kahn's algorithm over the specs' positions: take the specs
-- whose after lists are satisfied, satisfy what waits on them, repeat; specs
-- never taken are on a cycle or behind one. Linear in specs and edges: the
-- transitive closure this replaced held n^2/2 pairs for a chain of n (a
-- 10,000-job chain took 73-82 s to enqueue; now well under a second). Only to
-- name a key on the cycle does it walk the leftover specs that way.
CREATE FUNCTION pgqueue._check_after_cycles(p_specs jsonb, p_label text) RETURNS void
-- The joins of function scans below are estimated at 100 rows a side and planned as
-- nested loops: n^2 comparisons for n specs. Hash joins keep them linear. The lateral
-- scans can only be nested loops: their disabled cost then passes jit_above_cost, and
-- JIT compiled the query (0.4 s for three specs); this check never gains from it.
LANGUAGE plpgsql STABLE SET enable_nestloop = off SET jit = off AS $$
DECLARE
    v_n int;           -- specs, numbered 1..n in spec order (_insert_specs' ord)
    v_pending int[];   -- per spec: the specs it waits for not taken yet
    v_waiting int[];   -- the edges sorted by the spec waited on: the spec that waits
    v_deps int[];      -- ... and the spec waited on
    v_first int[];     -- per spec: its first edge in v_waiting (v_first[i + 1] ends it)
    v_queue int[];
    v_head int := 1;
    v_tail int := 0;
    v_node int;
    v_waiter int;
    v_names text[];    -- per spec: its key
    v_merged text[];   -- per spec: its dedup_key, if later specs merge into it
    v_key text;
    v_dedup text;
BEGIN
    -- Two graphs in one: each spec waiting for the specs its "after" names (the graph
    -- written when no spec merges), and the graph _insert_specs writes when specs with
    -- the same dedup_key are one job, the first of them (the others merge into it and
    -- add no edges, and an "after" naming a merged spec waits for that first one). A
    -- cycle in either is refused: in the second, a survivor waiting, directly or through
    -- others, for a spec merged into itself would wait for itself (an edge it cannot
    -- have) or for a job that waits for it; the first is written when merging does not
    -- happen (a stored spec whose dependency ended gives its dedup_key up).
    WITH spec AS (
        SELECT e.ord::int AS pos, CASE WHEN jsonb_typeof(e.s->'key') = 'string' THEN e.s->>'key' END AS k,
               e.s->'after' AS after,
               CASE WHEN jsonb_typeof(e.s->'dedup_key') = 'string' THEN e.s->>'dedup_key' END AS dk
        FROM jsonb_array_elements(p_specs) WITH ORDINALITY AS e(s, ord)
    ), node AS (
        SELECT sp.*, CASE WHEN sp.dk IS NULL THEN sp.pos
                          ELSE min(sp.pos) OVER (PARTITION BY sp.dk) END AS job,
               count(*) OVER (PARTITION BY sp.dk) AS copies
        FROM spec sp
    ), edge AS (
        SELECT DISTINCT w.pos AS waiter, x.dep
        FROM node w
        CROSS JOIN LATERAL jsonb_array_elements_text(
            CASE WHEN jsonb_typeof(w.after) = 'array' THEN w.after ELSE '[]' END) AS a(k)
        JOIN node d ON d.k = a.k
        CROSS JOIN LATERAL (VALUES (d.pos), (CASE WHEN w.job = w.pos THEN d.job END)) AS x(dep)
        WHERE x.dep IS NOT NULL
    ), pending AS (
        SELECT e.waiter AS pos, count(*)::int AS n FROM edge e GROUP BY e.waiter
    ), waiters AS (
        SELECT e.dep AS pos, count(*)::int AS n FROM edge e GROUP BY e.dep
    ), per_spec AS (
        SELECT x.pos, x.k, CASE WHEN x.job = x.pos AND x.copies > 1 THEN x.dk END AS merged,
               coalesce(p.n, 0) AS pending,
               1 + coalesce(sum(coalesce(w.n, 0)) OVER (ORDER BY x.pos ROWS BETWEEN UNBOUNDED PRECEDING
                                                         AND 1 PRECEDING), 0)::int AS first
        FROM node x LEFT JOIN pending p ON p.pos = x.pos LEFT JOIN waiters w ON w.pos = x.pos
    )
    SELECT count(*)::int, array_agg(x.pending ORDER BY x.pos), array_agg(x.first ORDER BY x.pos),
           array_agg(x.k ORDER BY x.pos), array_agg(x.merged ORDER BY x.pos),
           (SELECT coalesce(array_agg(e.waiter ORDER BY e.dep, e.waiter), '{}') FROM edge e),
           (SELECT coalesce(array_agg(e.dep ORDER BY e.dep, e.waiter), '{}') FROM edge e)
      INTO v_n, v_pending, v_first, v_names, v_merged, v_waiting, v_deps
      FROM per_spec x;
    IF v_n IS NULL OR v_n = 0 THEN
        RETURN;
    END IF;
    v_first := v_first || (cardinality(v_waiting) + 1);
    v_queue := array_fill(0, ARRAY[v_n]);
    FOR v_node IN 1 .. v_n LOOP
        IF v_pending[v_node] = 0 THEN
            v_tail := v_tail + 1;
            v_queue[v_tail] := v_node;
        END IF;
    END LOOP;
    WHILE v_head <= v_tail LOOP
        v_node := v_queue[v_head];
        v_head := v_head + 1;
        FOR i IN v_first[v_node] .. v_first[v_node + 1] - 1 LOOP
            v_waiter := v_waiting[i];
            v_pending[v_waiter] := v_pending[v_waiter] - 1;
            IF v_pending[v_waiter] = 0 THEN
                v_tail := v_tail + 1;
                v_queue[v_tail] := v_waiter;
            END IF;
        END LOOP;
    END LOOP;
    IF v_tail = v_n THEN
        RETURN;
    END IF;
    -- Name the cycle: among the specs never taken, one that reaches itself (the lowest),
    -- by its key; one that others merged into, by its dedup_key.
    WITH RECURSIVE edge(waiter, dep) AS (
        SELECT u.waiter, u.dep FROM unnest(v_waiting, v_deps) AS u(waiter, dep)
        WHERE v_pending[u.waiter] > 0 AND v_pending[u.dep] > 0
    ), reach(start, node) AS (
        SELECT waiter, dep FROM edge
        UNION
        SELECT r.start, e.dep FROM reach r JOIN edge e ON e.waiter = r.node
    ), on_cycle AS (
        SELECT DISTINCT r.start AS pos FROM reach r WHERE r.start = r.node
    )
    SELECT v_names[c.pos], v_merged[c.pos] INTO v_key, v_dedup
      FROM on_cycle c ORDER BY v_merged[c.pos] IS NULL, c.pos LIMIT 1;
    IF v_dedup IS NOT NULL THEN
        RAISE EXCEPTION '%: the after lists form a cycle through the specs with dedup_key "%" (one job: the first of them)',
            p_label, v_dedup
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RAISE EXCEPTION '%: the after lists form a cycle through key "%"', p_label, v_key
        USING ERRCODE = 'invalid_parameter_value';
END
$$;

-- Validate an array of specs (and, recursively, their next_jobs); raise the
-- first problem, prefixed with where it is (label[index]). One pass over the
-- specs finds the first bad one and collects what the later checks need (the
-- keys, which specs have after lists), so a fan-out of a thousand children
-- and a join is not taken apart once per check; the queries that name a
-- duplicate key or an unknown one run only when there is one.
CREATE FUNCTION pgqueue._check_specs(p_specs jsonb, p_label text, p_single boolean DEFAULT false,
                                     p_stored int DEFAULT 0) RETURNS void
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_ord bigint;
    v_problem text;
    v_key text;
    v_spec jsonb;
    v_run_after boolean;
    v_at timestamptz;
    v_nested boolean;
    v_after boolean;   -- some spec has an after list
    v_known boolean;   -- every name in the after lists is a key
    v_keys jsonb;      -- {key: whether that spec has an after list}
    v_nkeys bigint;
    v_chained boolean;
    v_merging boolean; -- two specs share a dedup_key
BEGIN
    IF jsonb_typeof(p_specs) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION '%: must be a JSON array of job specs, got %', p_label, coalesce(jsonb_typeof(p_specs), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    SELECT min(e.ord) FILTER (WHERE pgqueue._spec_problem(e.s) IS NOT NULL),
           bool_or(jsonb_typeof(e.s->'run_after') = 'string'),
           bool_or(jsonb_typeof(e.s->'next_jobs') = 'array'),
           bool_or(jsonb_typeof(e.s->'after') = 'array'),
           jsonb_object_agg(e.s->>'key', CASE WHEN jsonb_typeof(e.s->'after') = 'array'
                                               THEN jsonb_array_length(e.s->'after') > 0 ELSE false END)
               FILTER (WHERE jsonb_typeof(e.s->'key') = 'string'),
           count(*) FILTER (WHERE jsonb_typeof(e.s->'key') = 'string')
      INTO v_ord, v_run_after, v_nested, v_after, v_keys, v_nkeys
      FROM jsonb_array_elements(p_specs) WITH ORDINALITY AS e(s, ord);
    IF v_ord IS NOT NULL THEN
        RAISE EXCEPTION '%: %', pgqueue._spec_where(p_label, v_ord, p_single, p_stored), pgqueue._spec_problem(p_specs->(v_ord::int - 1))
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- Timestamps need a cast to validate; only specs that carry one pay for it.
    FOR v_ord, v_spec IN
        SELECT e.ord, e.s FROM jsonb_array_elements(p_specs) WITH ORDINALITY AS e(s, ord)
        WHERE v_run_after AND jsonb_typeof(e.s->'run_after') = 'string'
    LOOP
        BEGIN
            v_at := (v_spec->>'run_after')::timestamptz;
        EXCEPTION WHEN others THEN
            RAISE EXCEPTION '%: run_after is not a valid timestamp: %', pgqueue._spec_where(p_label, v_ord, p_single, p_stored),
                v_spec->>'run_after'
                USING ERRCODE = 'invalid_parameter_value';
        END;
        IF NOT isfinite(v_at) THEN
            RAISE EXCEPTION '%: run_after must be a finite timestamp, got %',
                pgqueue._spec_where(p_label, v_ord, p_single, p_stored), v_spec->>'run_after'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END LOOP;

    -- jsonb_object_agg keeps one entry per key: fewer entries than keyed specs
    -- means a key is used twice.
    IF v_nkeys > 0 AND v_nkeys <> (SELECT count(*) FROM jsonb_object_keys(v_keys)) THEN
        SELECT e.s->>'key' INTO v_key FROM jsonb_array_elements(p_specs) WITH ORDINALITY AS e(s, ord)
        WHERE jsonb_typeof(e.s->'key') = 'string' GROUP BY 1 HAVING count(*) > 1 ORDER BY min(e.ord) LIMIT 1;
        RAISE EXCEPTION '%: key "%" is used by more than one spec', p_label, v_key
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    IF v_after THEN
        -- Every name in an after list must be a key (a lookup in v_keys each);
        -- v_chained: some after list names a spec that has one of its own.
        SELECT bool_and(coalesce(v_keys ? a.k, false)), bool_or(coalesce((v_keys->>a.k)::boolean, false))
          INTO v_known, v_chained
          FROM jsonb_path_query(p_specs, '$[*].after[*] ? (@.type() == "string")') AS n(v), LATERAL (SELECT n.v #>> '{}' AS k) a;
        IF NOT v_known THEN
            SELECT e.ord, a.k INTO v_ord, v_key
            FROM jsonb_array_elements(p_specs) WITH ORDINALITY AS e(s, ord),
                 jsonb_array_elements_text(coalesce(nullif(e.s->'after', 'null'), '[]')) AS a(k)
            WHERE NOT coalesce(v_keys ? a.k, false)
            ORDER BY e.ord LIMIT 1;
            RAISE EXCEPTION '%: after names unknown key "%"', pgqueue._spec_where(p_label, v_ord, p_single, p_stored), v_key
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;

    -- A cycle among "after" lists would leave every job on it waiting forever.
    -- Every node on a cycle has an after list and is named in one, so unless
    -- an after list names a spec with an after list (v_chained) there is none:
    -- a fan-out's join after N children walks nothing.
    -- Specs sharing a dedup_key are one job: "after" between them (or through others)
    -- makes a cycle of one job, which v_chained alone does not see. Looked for only where
    -- there are after lists and dedup keys both (a fan-out and its join have no keys).
    IF v_after AND NOT coalesce(v_chained, false)
       AND p_specs @? '$[*].dedup_key ? (@.type() == "string")' THEN
        SELECT count(*) <> count(DISTINCT e.s->>'dedup_key') INTO v_merging
          FROM jsonb_array_elements(p_specs) AS e(s)
         WHERE jsonb_typeof(e.s->'dedup_key') = 'string';
    END IF;
    IF v_chained OR v_merging THEN
        PERFORM pgqueue._check_after_cycles(p_specs, p_label);
    END IF;

    IF v_nested THEN
        PERFORM pgqueue._check_nested_specs(p_specs, p_label, p_single, p_stored);
    END IF;
END
$$;

-- Take the dedup-key lock. enqueue and every requeue take it, so "is another
-- job with this key pending?" and the write that depends on the answer cannot
-- interleave with a concurrent enqueue of the same key.
CREATE FUNCTION pgqueue._lock_dedup_key(p_key text) RETURNS void
LANGUAGE sql AS $$
    SELECT pg_advisory_xact_lock(pgqueue._lock_class('dedup'), hashtext(p_key))
$$;

-- Was the pipeline cancelled? Takes the pipeline lock first, so the answer
-- holds until commit: cancel_pipeline() takes the same lock.
CREATE FUNCTION pgqueue._pipeline_cancelled(p_pipeline_id uuid) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF p_pipeline_id IS NULL THEN
        RETURN false;
    END IF;
    PERFORM pg_advisory_xact_lock(pgqueue._lock_class('pipeline'), hashtext(p_pipeline_id::text));
    RETURN EXISTS (SELECT 1 FROM pgqueue.cancelled_pipelines c WHERE c.pipeline_id = p_pipeline_id);
END
$$;

-- Many keys' locks, each once and in key order, so that two transactions
-- locking overlapping sets never deadlock on them.
CREATE FUNCTION pgqueue._lock_dedup_keys(p_keys text[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    -- In lock-key order, not name order: two names can share a hashtext. (A lock per
    -- key, held to commit: some 13,000 distinct keys in one transaction run a default
    -- server's lock table out; see docs/sql.md.)
    PERFORM pg_advisory_xact_lock(pgqueue._lock_class('dedup'), h)
    FROM (SELECT DISTINCT hashtext(k) AS h FROM unnest(p_keys) k WHERE k IS NOT NULL ORDER BY 1) keys;
END
$$;

-- Many pipelines' locks (see _pipeline_cancelled), each once and in order.
CREATE FUNCTION pgqueue._lock_pipelines(p_pipeline_ids uuid[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    -- In lock-key order (hashtext), not id order: two ids can share a key.
    PERFORM pgqueue._pipeline_cancelled(p)
    FROM (SELECT DISTINCT ON (hashtext(p::text)) p FROM unnest(p_pipeline_ids) p WHERE p IS NOT NULL
          ORDER BY hashtext(p::text)) pipelines;
END
$$;

-- The pending job an enqueue of key p_key merges into, held FOR SHARE (no claim
-- or transition can take it before this transaction ends), or NULL. The caller
-- holds the key's lock: no other job can take the key meanwhile. Shared, not
-- for update as an INSERT's ON CONFLICT locks: two enqueues, each merging into
-- the other's dependency (which each holds shared), deadlocked (40P01).
-- A job some transaction holds right now (a claim, a completion queueing it)
-- is waited for in a subtransaction: if it is no longer pending once granted,
-- PostgreSQL keeps the row lock all the same (the re-checked row is just not
-- returned), and the enqueue, holding it, went on to wait for its dependencies,
-- which a cancel_pipeline locking both (the dependency the older) held (40P01).
-- Rolled back, the subtransaction lets it go. Only then: a subtransaction takes
-- a transaction id of its own once it locks a row, and one per merge would
-- overflow the 64 a backend's snapshot entry holds in a transaction merging many.
CREATE FUNCTION pgqueue._merge_target(p_key text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_id bigint;
BEGIN
    SELECT j.id INTO v_id FROM pgqueue.jobs j
    WHERE j.dedup_key = p_key AND j.state IN ('waiting', 'queued')
    FOR SHARE SKIP LOCKED;
    IF FOUND OR NOT EXISTS (SELECT 1 FROM pgqueue.jobs j
                            WHERE j.dedup_key = p_key AND j.state IN ('waiting', 'queued')) THEN
        RETURN v_id;
    END IF;
    BEGIN
        SELECT j.id INTO STRICT v_id FROM pgqueue.jobs j
        WHERE j.dedup_key = p_key AND j.state IN ('waiting', 'queued')
        FOR SHARE;
        RETURN v_id;
    EXCEPTION WHEN no_data_found THEN
        RETURN NULL;  -- it left pending while this waited
    END;
END
$$;

-- Why a dependency is refused: NULL (p_id NULL), unknown (p_state NULL), or
-- already failed or cancelled.
CREATE FUNCTION pgqueue._refuse_dependency(p_label text, p_id bigint, p_state text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF p_id IS NULL THEN
        RAISE EXCEPTION '%: depends_on must not contain NULL', p_label
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF p_state IS NULL THEN
        RAISE EXCEPTION '%: depends_on names unknown job id %', p_label, p_id
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RAISE EXCEPTION '%: dependency % is already %, so the job could never run', p_label, p_id, p_state
        USING ERRCODE = 'invalid_parameter_value';
END
$$;

-- The dependencies of a request that merges into a pending job, which takes
-- none of them: checked as _lock_dependencies checks them (bad input is
-- refused whether or not the key merges), but read, not locked.
CREATE FUNCTION pgqueue._check_dependencies(p_ids bigint[], p_label text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_bad record;
BEGIN
    SELECT want.id, j.state INTO v_bad
    FROM (SELECT DISTINCT i FROM unnest(p_ids) i) AS want(id)
    LEFT JOIN pgqueue.jobs j ON j.id = want.id
    WHERE j.id IS NULL OR j.state IN ('failed', 'cancelled')
    ORDER BY j.id IS NOT NULL, want.id LIMIT 1;
    IF FOUND THEN
        PERFORM pgqueue._refuse_dependency(p_label, v_bad.id, v_bad.state);
    END IF;
END
$$;

-- Lock the jobs named in depends_on and return those already succeeded.
-- FOR SHARE makes a dependency that is finishing right now wait for this
-- transaction (or us for it), so its completion always sees the new
-- dependents and a fan-in can never be missed. Unknown ids and dependencies
-- that already failed or were cancelled are refused. The rows are locked in
-- id order (the nested loop follows the sorted ids), the order the
-- transitions that lock several of them take: enqueue's ids came in a
-- DISTINCT's hash order (11, 13, 10, 12), which could deadlock.
CREATE FUNCTION pgqueue._lock_dependencies(p_ids bigint[], p_label text) RETURNS bigint[]
LANGUAGE plpgsql AS $$
DECLARE
    v_bad record;
    v_succeeded bigint[];
BEGIN
    SELECT want.id, x.state INTO v_bad
    FROM (SELECT DISTINCT i FROM unnest(p_ids) i ORDER BY 1) AS want(id)
    LEFT JOIN LATERAL (SELECT j.id, j.state FROM pgqueue.jobs j WHERE j.id = want.id FOR SHARE) x ON true
    WHERE x.id IS NULL OR x.state IN ('failed', 'cancelled')
    ORDER BY x.id IS NOT NULL, want.id LIMIT 1;
    IF FOUND THEN
        PERFORM pgqueue._refuse_dependency(p_label, v_bad.id, v_bad.state);
    END IF;
    SELECT coalesce(array_agg(j.id), '{}') INTO v_succeeded
    FROM pgqueue.jobs j WHERE j.id = ANY (p_ids) AND j.state = 'succeeded';
    PERFORM pgqueue._announce_held(p_ids);
    RETURN v_succeeded;
END
$$;

-- Queued jobs this transaction holds a row lock on and leaves queued (a
-- dependency an enqueue share-locks, a pending job a dedup key merges into, a
-- retry's dependencies): a claim running meanwhile skips them (SKIP LOCKED),
-- comes back short, and its worker sleeps; nothing announces them when the
-- lock goes (no row enters queued), so they waited for the worker's poll
-- (5 s by default). Their queues are notified: delivered at this commit, once
-- the row locks are gone. Only due ones: a worker wakes for a later one at its
-- run_after by itself (one still held then waits for the poll: rare).
CREATE FUNCTION pgqueue._announce_held(p_ids bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pgqueue._notify(ARRAY(SELECT DISTINCT j.queue FROM pgqueue.jobs j
                                  WHERE j.id = ANY (p_ids) AND j.state = 'queued'
                                    AND NOT j.scope_blocked AND NOT j.queue_paused
                                    AND j.run_after <= clock_timestamp()),
                            pgqueue._setting('notify'));
END
$$;

-- Enqueue's test (see the scope heads in 04_claim.sql): is an active (queued
-- or running) job of the scope older than p_job_id? Read backwards from
-- p_job_id, where the scope's live jobs are, not forwards over the entries its
-- finished jobs left. Only under READ COMMITTED: a REPEATABLE READ snapshot
-- may predate the end of that job (a transition this enqueue's order lock
-- waited for, or one before), and the new job would stay blocked for good.
-- Entered unblocked, a job is always safe (claims re-check the scope).
CREATE FUNCTION pgqueue._behind_older(p_scope jsonb, p_job_id bigint) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT current_setting('transaction_isolation') IN ('read committed', 'read uncommitted')
       AND EXISTS (SELECT 1 FROM (SELECT o.id FROM pgqueue.jobs o
                                  WHERE pgqueue._same_scope(o.scope, p_scope)
                                    AND o.state IN ('queued', 'running') AND o.id < p_job_id
                                  ORDER BY jsonb_hash(o.scope) DESC, o.id DESC LIMIT 1) x)
$$;

-- The jobs rows _insert_specs writes, one per spec (in spec order; a spec whose
-- dedup key an earlier spec of the array has is left out: it merges into that
-- job). Written once for its two INSERTs, with and without ON CONFLICT; a SQL
-- function of one SELECT, so the planner inlines it into each. p_new holds the
-- ids allocated for the specs, p_succeeded the dependencies that already
-- succeeded, p_unlocked the scope order lock keys not taken (see
-- _share_scope_order), NULL when scoped specs may not be entered blocked at all.
CREATE FUNCTION pgqueue._spec_rows(p_specs jsonb, p_new bigint[], p_succeeded bigint[], p_cancelled boolean,
                                   p_unlocked int[], p_max_attempts int, p_pipeline_id uuid, p_parent_id bigint)
RETURNS TABLE (id bigint, queue text, job_type text, payload jsonb, state text, priority int, scope jsonb,
               dedup_key text, max_attempts int, run_after timestamptz, pipeline_id uuid, parent_id bigint,
               next_jobs jsonb, finished_at timestamptz, last_error text, scope_blocked boolean)
LANGUAGE sql STABLE AS $$
    WITH spec0 AS (
        SELECT e.ord, e.s, p_new[e.ord] AS new_id, e.s->>'dedup_key' AS dk, nullif(e.s->'scope', 'null') AS scope,
               row_number() OVER (PARTITION BY e.s->>'dedup_key' ORDER BY e.ord) AS dk_rank,
               CASE WHEN p_cancelled THEN 'cancelled'
                    WHEN jsonb_array_length(coalesce(nullif(e.s->'after', 'null'), '[]')) > 0
                      OR EXISTS (SELECT 1 FROM jsonb_array_elements_text(
                                     coalesce(nullif(e.s->'depends_on', 'null'), '[]')) d
                                 WHERE d::numeric::bigint <> ALL (p_succeeded))
                    THEN 'waiting' ELSE 'queued' END AS st
        FROM jsonb_array_elements(p_specs) WITH ORDINALITY AS e(s, ord)
    ), spec AS (
        -- queued keyless jobs of the same scope earlier in the array (a spec with a
        -- dedup key may merge into another job, so it blocks nobody)
        SELECT sp.*, p_unlocked IS NOT NULL AND sp.scope IS NOT NULL AND sp.st = 'queued'
                     AND (count(*) FILTER (WHERE sp.dk IS NULL AND sp.st = 'queued')
                              OVER (PARTITION BY sp.scope ORDER BY sp.ord
                                    ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) > 0
                          OR pgqueue._scope_lock_key(sp.scope) NOT IN (SELECT unnest(p_unlocked))
                             AND pgqueue._behind_older(sp.scope, sp.new_id)) AS blocked
        FROM spec0 sp
    )
    SELECT sp.new_id,
           coalesce(sp.s->>'queue', 'default'),
           sp.s->>'job_type',
           coalesce(nullif(sp.s->'payload', 'null'), '{}'),
           sp.st,
           -- through numeric: the validator accepts an integral 2.0, which ::int refuses
           coalesce((sp.s->>'priority')::numeric::int, 0),
           sp.scope,
           sp.dk,
           coalesce((sp.s->>'max_attempts')::numeric::int, p_max_attempts),
           coalesce((sp.s->>'run_after')::timestamptz, now()),
           coalesce(p_pipeline_id, (sp.s->>'pipeline_id')::uuid),
           p_parent_id,
           nullif(sp.s->'next_jobs', 'null'),
           CASE WHEN p_cancelled THEN now() END,
           CASE WHEN p_cancelled THEN 'pipeline cancelled' END,
           coalesce(sp.blocked, false)
    FROM spec sp
    WHERE sp.dk IS NULL OR sp.dk_rank = 1
    ORDER BY sp.ord
$$;

-- Create jobs from validated specs; returns their ids in spec order (a spec
-- merged into a pending job with the same dedup_key returns that job's id).
CREATE FUNCTION pgqueue._insert_specs(p_specs jsonb, p_pipeline_id uuid, p_parent_id bigint, p_label text,
                                      p_single boolean DEFAULT false, p_stored int DEFAULT 0)
RETURNS bigint[]
LANGUAGE plpgsql AS $$
DECLARE
    v_n int;
    v_new bigint[];
    v_ids bigint[];
    v_merged bigint[];
    v_held_keys text[];  -- keys of pending jobs the specs merge into, and those jobs
    v_held_ids bigint[];
    v_dep_ids bigint[];
    v_succeeded bigint[] := '{}';
    v_bad record;
    v_max_attempts int := pgqueue._setting_int('max_attempts');
    v_has_edges boolean;
    v_cancelled boolean := false;
    v_pipeline uuid;
    v_unlocked int[];  -- NULL: no scope order locks taken, scoped specs enter unblocked
    v_dead bigint[];      -- dependencies of stored specs that can no longer succeed
    v_dead_why text[];
    v_gone bigint[];      -- ... of them, the ones no longer there (pruned)
    v_doomed_ords bigint[];  -- the stored specs naming one (positions), and the lowest they name
    v_doomed_deps bigint[];
    v_doomed bigint[];    -- the children cancelled for them
BEGIN
    -- A parent's stored specs and the ones passed to complete() are two arrays, and keys
    -- are local to their array: the stored keys (and their after lists, which name only
    -- stored keys, checked when stored) are set apart, so that the same key in both (a
    -- fan-out stored at enqueue and another returned by the handler) is no duplicate, and
    -- a passed "after" finds no stored key.
    IF p_stored > 0 AND jsonb_array_length(p_specs) > p_stored AND p_specs @? '$[*].key' THEN
        SELECT jsonb_agg(CASE WHEN e.ord <= p_stored THEN e.s || jsonb_strip_nulls(jsonb_build_object(
                   'key', CASE WHEN jsonb_typeof(e.s->'key') = 'string'
                               THEN to_jsonb(E'\x1fstored:' || (e.s->>'key')) END,
                   'after', CASE WHEN jsonb_typeof(e.s->'after') = 'array' AND jsonb_array_length(e.s->'after') > 0
                                 THEN (SELECT jsonb_agg(to_jsonb(E'\x1fstored:' || (a.k #>> '{}')))
                                       FROM jsonb_array_elements(e.s->'after') a(k)) END))
                   ELSE e.s END ORDER BY e.ord)
          INTO p_specs
          FROM jsonb_array_elements(p_specs) WITH ORDINALITY AS e(s, ord);
    END IF;
    PERFORM pgqueue._check_spec_depth(p_specs, p_label);
    PERFORM pgqueue._check_specs(p_specs, p_label, p_single, p_stored);
    IF p_specs @? '$[*].next_jobs[*]' THEN
        PERFORM pgqueue._check_child_pipelines(e.s->'next_jobs',
                    CASE WHEN p_parent_id IS NULL THEN (e.s->>'pipeline_id')::uuid ELSE p_pipeline_id END,
                    pgqueue._spec_where(p_label, e.ord, p_single, p_stored) || ': next_jobs'),
                pgqueue._check_stored_dependencies(e.s->'next_jobs',
                    pgqueue._spec_where(p_label, e.ord, p_single, p_stored) || ': next_jobs')
        FROM jsonb_array_elements(p_specs) WITH ORDINALITY AS e(s, ord)
        WHERE jsonb_typeof(e.s->'next_jobs') = 'array'
          AND e.ord > p_stored;  -- specs stored earlier were checked when they were stored
    END IF;
    v_n := jsonb_array_length(p_specs);
    IF v_n = 0 THEN
        RETURN '{}';
    END IF;
    -- Children inherit their parent's pipeline (a spec naming another is
    -- refused). A cancelled pipeline grows no new work: children of a member
    -- that was still running when it was cancelled are recorded as cancelled;
    -- an explicit enqueue into it is refused.
    IF p_parent_id IS NOT NULL THEN
        SELECT e.ord INTO v_bad FROM jsonb_array_elements(p_specs) WITH ORDINALITY e(s, ord)
        WHERE (e.s->>'pipeline_id')::uuid IS DISTINCT FROM p_pipeline_id AND e.s ? 'pipeline_id'
              AND e.s->'pipeline_id' <> 'null'
        ORDER BY e.ord LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION '%: pipeline_id differs from the parent''s; children inherit it',
                pgqueue._spec_where(p_label, v_bad.ord, p_single, p_stored)
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        v_cancelled := pgqueue._pipeline_cancelled(p_pipeline_id);
    ELSE
        -- In lock-key order, as _lock_pipelines takes them (a completion creating
        -- children in several pipelines): in id order, each held one and waited
        -- for the other (40P01).
        FOR v_pipeline IN
            SELECT p.id FROM (SELECT DISTINCT (e.s->>'pipeline_id')::uuid AS id FROM jsonb_array_elements(p_specs) e(s)
                              WHERE p_specs @? '$[*].pipeline_id' AND e.s->>'pipeline_id' IS NOT NULL) p
            ORDER BY hashtext(p.id::text), p.id
        LOOP
            IF pgqueue._pipeline_cancelled(v_pipeline) THEN
                RAISE EXCEPTION '%: pipeline % was cancelled', p_label, v_pipeline
                    USING ERRCODE = 'invalid_parameter_value';
            END IF;
        END LOOP;
    END IF;

    -- Scoped jobs behind an older queued or running job of their scope are
    -- entered blocked, as enqueue() does, under the scopes' shared order locks.
    -- Not for children: the completion creating them holds its own scopes'
    -- order locks exclusively, and taking others now, out of key order, could
    -- deadlock two completions; children enter unblocked (always safe). The
    -- locks come after the pipeline's and before the dedup keys' and the
    -- dependencies' (the order every pgqueue transaction takes them in).
    IF p_parent_id IS NULL AND p_specs @? '$[*].scope ? (@ != null)' THEN
        v_unlocked := pgqueue._share_scope_order(ARRAY(SELECT e.s->'scope' FROM jsonb_array_elements(p_specs) e(s)));
    END IF;

    -- Dedup keys: lock in a fixed order (no deadlock between two batches).
    PERFORM pgqueue._lock_dedup_keys(ARRAY(SELECT e.s->>'dedup_key' FROM jsonb_array_elements(p_specs) e(s)
                                           WHERE p_specs @? '$[*].dedup_key'));

    SELECT array_agg(DISTINCT d::numeric::bigint), bool_or(true) INTO v_dep_ids, v_has_edges
    FROM jsonb_array_elements(p_specs) e(s),
         jsonb_array_elements_text(coalesce(nullif(e.s->'depends_on', 'null'), '[]')) d
    WHERE p_specs @? '$[*].depends_on[*]';
    IF v_dep_ids IS NOT NULL AND p_stored > 0 THEN
        -- The parent's stored specs (the first p_stored) were checked when they were
        -- stored; a dependency may have failed, been cancelled or pruned since. Their
        -- parent's success must not be refused for it (it would be, every time): such a
        -- child is created, then cancelled below. Every dependency is share-locked in
        -- id order first, as _lock_dependencies does; the specs passed to complete()
        -- then get its checks (they are the caller's input: refused).
        SELECT coalesce(array_agg(w.id) FILTER (WHERE x.state = 'succeeded'), '{}'),
               array_agg(w.id) FILTER (WHERE x.id IS NULL OR x.state IN ('failed', 'cancelled')),
               array_agg(CASE x.state WHEN 'failed' THEN 'failed' WHEN 'cancelled' THEN 'was cancelled'
                                      ELSE 'no longer exists' END)
                   FILTER (WHERE x.id IS NULL OR x.state IN ('failed', 'cancelled')),
               array_agg(w.id) FILTER (WHERE x.id IS NULL)
          INTO v_succeeded, v_dead, v_dead_why, v_gone
          FROM (SELECT DISTINCT i FROM unnest(v_dep_ids) i ORDER BY 1) AS w(id)
          LEFT JOIN LATERAL (SELECT j.id, j.state FROM pgqueue.jobs j WHERE j.id = w.id FOR SHARE) x ON true;
        PERFORM pgqueue._announce_held(v_dep_ids);
        -- The stored specs that name one of them (by position), with the lowest such: the
        -- lowest pruned one if any (see below).
        SELECT array_agg(e.ord ORDER BY e.ord), array_agg(x.dep ORDER BY e.ord) INTO v_doomed_ords, v_doomed_deps
          FROM jsonb_array_elements(p_specs) WITH ORDINALITY AS e(s, ord)
         CROSS JOIN LATERAL (SELECT coalesce(min(d::numeric::bigint) FILTER (WHERE d::numeric::bigint = ANY (v_gone)),
                                             min(d::numeric::bigint)) AS dep
                             FROM jsonb_array_elements_text(coalesce(nullif(e.s->'depends_on', 'null'), '[]')) d
                             WHERE d::numeric::bigint = ANY (v_dead)) x
         WHERE e.ord <= p_stored AND x.dep IS NOT NULL;
        PERFORM pgqueue._lock_dependencies(ARRAY(
                    SELECT DISTINCT d::numeric::bigint
                    FROM jsonb_array_elements(p_specs) WITH ORDINALITY AS e(s, ord),
                         jsonb_array_elements_text(coalesce(nullif(e.s->'depends_on', 'null'), '[]')) d
                    WHERE e.ord > p_stored), p_label);
    ELSIF v_dep_ids IS NOT NULL THEN
        v_succeeded := pgqueue._lock_dependencies(v_dep_ids, p_label);
    END IF;
    -- The specs cancelled below (a stored spec naming a dependency that ended, and
    -- what waits on it through "after") take part in no coalescing: they give their
    -- dedup keys up, so that none merges into a pending job it would not run for, and
    -- none takes in a later spec of the array with its key, which would be lost.
    IF v_doomed_ords IS NOT NULL AND p_specs @? '$[*].dedup_key ? (@ != null)' THEN
        WITH RECURSIVE spec AS (
            SELECT e.ord, e.s FROM jsonb_array_elements(p_specs) WITH ORDINALITY AS e(s, ord)
        ), doomed(ord, k) AS (
            SELECT sp.ord, sp.s->>'key' FROM spec sp WHERE sp.ord = ANY (v_doomed_ords)
            UNION
            SELECT sp.ord, sp.s->>'key' FROM doomed dm JOIN spec sp ON jsonb_typeof(sp.s->'after') = 'array'
                                                                   AND sp.s->'after' ? dm.k
        )
        SELECT jsonb_agg(CASE WHEN sp.ord IN (SELECT dm.ord FROM doomed dm) THEN sp.s - 'dedup_key' ELSE sp.s END
                         ORDER BY sp.ord)
          INTO p_specs
          FROM spec sp;
    END IF;
    v_has_edges := coalesce(v_has_edges, false) OR p_specs @? '$[*].after[*]';

    -- Ids are allocated up front so "after" keys can be resolved to ids.
    SELECT array_agg(nextval('pgqueue.jobs_id_seq')) INTO v_new FROM generate_series(1, v_n);

    IF p_specs @? '$[*].dedup_key ? (@ != null)' THEN
        -- The pending jobs the keys merge into, held FOR SHARE in id order (so none is
        -- claimed or finished before this transaction ends) and used instead of new
        -- ones, as enqueue() does: locked for update by the INSERT's ON CONFLICT, two
        -- batches each merging into the other's dependency deadlocked. After the
        -- dependencies' locks; the keys' locks are held, so no other job takes a key
        -- meanwhile, and one that left pending while this waited is not found: its
        -- spec is inserted.
        SELECT coalesce(array_agg(h.dedup_key ORDER BY h.id), '{}'), coalesce(array_agg(h.id ORDER BY h.id), '{}')
          INTO v_held_keys, v_held_ids
          FROM (SELECT j.id, j.dedup_key FROM pgqueue.jobs j
                WHERE j.dedup_key = ANY (ARRAY(SELECT e.s->>'dedup_key' FROM jsonb_array_elements(p_specs) e(s)))
                  AND j.state IN ('waiting', 'queued')
                ORDER BY j.id FOR SHARE) h;
        WITH ins AS (
            INSERT INTO pgqueue.jobs AS j
                (id, queue, job_type, payload, state, priority, scope, dedup_key, max_attempts, run_after,
                 pipeline_id, parent_id, next_jobs, finished_at, last_error, scope_blocked)
            SELECT * FROM pgqueue._spec_rows(p_specs, v_new, v_succeeded, v_cancelled, v_unlocked, v_max_attempts,
                                             p_pipeline_id, p_parent_id) r
            -- (NOT IN a subquery, hashed: "<> ALL (array)" compared each row with every
            -- key, and the lookups below scanned the arrays per spec: 10,000 specs merging
            -- into pending jobs took 2-3 s against 0.2 s inserted, a scale review.)
            WHERE r.dedup_key IS NULL OR r.dedup_key NOT IN (SELECT unnest(v_held_keys))
            -- A pending job with the key that the look above missed (written without
            -- the key's lock: by hand): lock it and return it.
            ON CONFLICT (dedup_key) WHERE state IN ('waiting', 'queued') AND dedup_key IS NOT NULL
            DO UPDATE SET dedup_key = excluded.dedup_key
            RETURNING j.id, j.dedup_key
        )
        SELECT array_agg(coalesce(i.id, h.id, v_new[e.ord]) ORDER BY e.ord),
               array_agg(coalesce(i.id, h.id))
                   FILTER (WHERE coalesce(i.id, h.id) NOT IN (SELECT unnest(v_new)))
          INTO v_ids, v_merged
        FROM jsonb_array_elements(p_specs) WITH ORDINALITY AS e(s, ord)
        LEFT JOIN ins i ON i.dedup_key = e.s->>'dedup_key'
        LEFT JOIN unnest(v_held_keys, v_held_ids) AS h(k, id) ON h.k = e.s->>'dedup_key';
        IF v_merged IS NOT NULL THEN
            PERFORM pgqueue._announce_held(v_merged);  -- the pending jobs merged into, locked
        END IF;
    ELSE
        -- No dedup key: nothing can conflict, and a plain INSERT skips the
        -- speculative insertion ON CONFLICT makes for every row (its lock and an
        -- extra WAL record: ~10 % of a 1,001-row fan-out's INSERT).
        INSERT INTO pgqueue.jobs
            (id, queue, job_type, payload, state, priority, scope, dedup_key, max_attempts, run_after,
             pipeline_id, parent_id, next_jobs, finished_at, last_error, scope_blocked)
        SELECT * FROM pgqueue._spec_rows(p_specs, v_new, v_succeeded, v_cancelled, v_unlocked, v_max_attempts,
                                         p_pipeline_id, p_parent_id);
        v_ids := v_new;
    END IF;

    IF v_has_edges THEN
        WITH keyed AS (
            SELECT e.s->>'key' AS k, v_ids[e.ord] AS id
            FROM jsonb_array_elements(p_specs) WITH ORDINALITY AS e(s, ord) WHERE e.s ? 'key'
        ), edges AS (
        INSERT INTO pgqueue.job_dependencies (job_id, depends_on)
        SELECT DISTINCT v_ids[e.ord], dep.id
        FROM jsonb_array_elements(p_specs) WITH ORDINALITY AS e(s, ord)
        CROSS JOIN LATERAL (
            SELECT kd.id FROM jsonb_array_elements_text(coalesce(nullif(e.s->'after', 'null'), '[]')) a(k)
            JOIN keyed kd ON kd.k = a.k
            UNION ALL
            SELECT d::numeric::bigint FROM jsonb_array_elements_text(coalesce(nullif(e.s->'depends_on', 'null'), '[]')) d
        ) dep
        WHERE v_ids[e.ord] = v_new[e.ord]      -- merged specs add no edges to the job they merged into
          AND dep.id <> v_ids[e.ord]
          -- Nor to a dependency that is gone (pruned). One to a dependency that failed
          -- or was cancelled is written, as for any job that depended on it then: the
          -- child, cancelled below, waits for it again when either is retried.
          AND (v_gone IS NULL OR dep.id <> ALL (v_gone))
          AND (e.s ? 'after' OR e.s ? 'depends_on')
        -- No ON CONFLICT: every job_id here is new, and DISTINCT removes repeats.
        RETURNING job_id, depends_on
        )
        -- Fan-in counter: the dependencies not succeeded yet (a sibling never has).
        -- By primary key only (a job created cancelled keeps a count it never uses).
        UPDATE pgqueue.jobs j SET pending_deps = c.n
        FROM (SELECT e.job_id, count(*)::int AS n FROM edges e WHERE e.depends_on <> ALL (v_succeeded)
              GROUP BY e.job_id) c
        WHERE j.id = c.job_id;
    END IF;
    -- The stored specs whose dependency can no longer succeed were created waiting
    -- (without their dedup keys, see above); they are cancelled now, naming it, and
    -- with them what waits on them through "after".
    -- Named as any job a dependency's failure cancels ("dependency failed: job N
    -- failed"), with an edge to it: a retry of that dependency revives the child (it
    -- waits for it again), a retry of another of its dependencies does not (this one
    -- still failed), and a retry of the child makes it wait for all of them. A
    -- dependency that is gone cannot be waited for: a child naming one is "cancelled
    -- at creation" (no retry of another job revives it; a retry of the child itself
    -- runs it without that one, which is the operator's call).
    IF v_doomed_ords IS NOT NULL THEN
        WITH cancelled AS (
            UPDATE pgqueue.jobs j
               SET state = 'cancelled', finished_at = now(),
                   last_error = CASE WHEN x.dep = ANY (v_gone)
                                     THEN format('cancelled at creation: dependency job %s no longer exists', x.dep)
                                     ELSE format('dependency failed: job %s %s', x.dep,
                                                 v_dead_why[array_position(v_dead, x.dep)]) END
              FROM unnest(v_doomed_ords, v_doomed_deps) x(ord, dep)
             WHERE j.id = v_new[x.ord] AND j.state = 'waiting'
            RETURNING j.id
        )
        SELECT array_agg(c.id) INTO v_doomed FROM cancelled c;
        IF v_doomed IS NOT NULL THEN
            PERFORM pgqueue._cancel_dependents(v_doomed, 'was cancelled');
        END IF;
    END IF;

    RETURN v_ids;
END
$$;

-- The single-job path does not build a spec: scalar checks and one INSERT,
-- since this is the call applications make most. Valid input passes one
-- combined test (each term is NULL-safe: NULL means "use the default"); only
-- bad input walks the checks one by one to name its problem. A job with no
-- dedup key, dependency, follow-ups or pipeline takes a plain INSERT: nothing
-- can conflict, so no speculative insertion, locks or extra queries.
-- The default max_attempts is read by a sub-select in the INSERT itself, run
-- only when the caller gave none: a call of _setting (PL/pgSQL) cost ~17 µs of
-- a ~230 µs enqueue. _setting, after it, runs only if the row is gone, and
-- raises.
CREATE FUNCTION pgqueue.enqueue(
    job_type text,
    payload jsonb DEFAULT '{}',
    queue text DEFAULT 'default',
    scope jsonb DEFAULT NULL,
    dedup_key text DEFAULT NULL,
    run_after timestamptz DEFAULT NULL,
    priority int DEFAULT 0,
    max_attempts int DEFAULT NULL,
    pipeline_id uuid DEFAULT NULL,
    next_jobs jsonb DEFAULT NULL,
    depends_on bigint[] DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_id bigint;
    v_inserted boolean;
    v_succeeded bigint[] := '{}';
    v_deps bigint[];
    v_unlocked int[];
BEGIN
    IF enqueue.job_type IS NULL OR btrim(enqueue.job_type, E' \t\n\r\f\x0B') = '' OR jsonb_typeof(enqueue.payload) <> 'object'
       OR btrim(enqueue.queue, E' \t\n\r\f\x0B') = '' OR octet_length(enqueue.queue) > 200 OR btrim(enqueue.dedup_key, E' \t\n\r\f\x0B') = '' OR octet_length(enqueue.dedup_key) > 1000
       OR octet_length(enqueue.scope::text) > 1000 OR enqueue.max_attempts < 1
       OR NOT isfinite(enqueue.run_after) THEN
        IF enqueue.job_type IS NULL OR btrim(enqueue.job_type, E' \t\n\r\f\x0B') = '' THEN
            RAISE EXCEPTION 'pgqueue.enqueue: job_type must be a non-blank string'
                USING ERRCODE = 'invalid_parameter_value';
        ELSIF jsonb_typeof(enqueue.payload) <> 'object' THEN
            RAISE EXCEPTION 'pgqueue.enqueue: payload must be a JSON object, got %', jsonb_typeof(enqueue.payload)
                USING ERRCODE = 'invalid_parameter_value';
        ELSIF btrim(enqueue.queue, E' \t\n\r\f\x0B') = '' OR octet_length(enqueue.queue) > 200 THEN
            RAISE EXCEPTION 'pgqueue.enqueue: queue must be a non-blank string of at most 200 bytes'
                USING ERRCODE = 'invalid_parameter_value';
        ELSIF btrim(enqueue.dedup_key, E' \t\n\r\f\x0B') = '' OR octet_length(enqueue.dedup_key) > 1000 THEN
            RAISE EXCEPTION 'pgqueue.enqueue: dedup_key must be a non-blank string of at most 1000 bytes'
                USING ERRCODE = 'invalid_parameter_value';
        ELSIF NOT isfinite(enqueue.run_after) THEN
            -- never due, or due before every job (and the views' ages cannot subtract it)
            RAISE EXCEPTION 'pgqueue.enqueue: run_after must be a finite timestamp, got %', enqueue.run_after
                USING ERRCODE = 'invalid_parameter_value';
        ELSIF octet_length(enqueue.scope::text) > 1000 THEN
            RAISE EXCEPTION 'pgqueue.enqueue: scope must be at most 1000 bytes of JSON'
                USING ERRCODE = 'invalid_parameter_value';
        ELSE
            RAISE EXCEPTION 'pgqueue.enqueue: max_attempts must be >= 1, got %', enqueue.max_attempts
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;

    IF enqueue.dedup_key IS NULL AND enqueue.pipeline_id IS NULL AND enqueue.next_jobs IS NULL
       AND coalesce(cardinality(enqueue.depends_on), 0) = 0 THEN
        IF nullif(enqueue.scope, 'null') IS NOT NULL THEN
            -- Behind an older queued or running job of its scope, the job is
            -- entered blocked (out of the claim index); the end of that scope's
            -- running job unblocks the next. The shared order lock makes that end
            -- either visible to the check below or wait for this commit.
            v_unlocked := pgqueue._share_scope_order(ARRAY[enqueue.scope]);
            v_id := nextval('pgqueue.jobs_id_seq');
            INSERT INTO pgqueue.jobs AS j
                (id, queue, job_type, payload, state, priority, scope, max_attempts, run_after, scope_blocked)
            VALUES (v_id, coalesce(enqueue.queue, 'default'), enqueue.job_type, coalesce(enqueue.payload, '{}'),
                    'queued', coalesce(enqueue.priority, 0), enqueue.scope,
                    coalesce(enqueue.max_attempts,
                             (SELECT s.value::int FROM pgqueue.settings s WHERE s.name = 'max_attempts'),
                             pgqueue._setting_int('max_attempts')),
                    coalesce(enqueue.run_after, now()),
                    v_unlocked = '{}' AND pgqueue._behind_older(enqueue.scope, v_id));
            RETURN v_id;
        END IF;
        INSERT INTO pgqueue.jobs AS j (queue, job_type, payload, state, priority, scope, max_attempts, run_after)
        VALUES (coalesce(enqueue.queue, 'default'), enqueue.job_type, coalesce(enqueue.payload, '{}'), 'queued',
                coalesce(enqueue.priority, 0), nullif(enqueue.scope, 'null'),
                coalesce(enqueue.max_attempts,
                         (SELECT s.value::int FROM pgqueue.settings s WHERE s.name = 'max_attempts'),
                         pgqueue._setting_int('max_attempts')),
                coalesce(enqueue.run_after, now()))
        RETURNING j.id INTO v_id;
        RETURN v_id;
    END IF;

    v_deps := ARRAY(SELECT DISTINCT unnest(enqueue.depends_on));
    IF enqueue.next_jobs IS NOT NULL THEN
        -- One level less: the job itself is the first (as for the same spec in enqueue_many).
        PERFORM pgqueue._check_spec_depth(enqueue.next_jobs, 'pgqueue.enqueue: next_jobs', 99);
        PERFORM pgqueue._check_specs(enqueue.next_jobs, 'pgqueue.enqueue: next_jobs');
        PERFORM pgqueue._check_child_pipelines(enqueue.next_jobs, enqueue.pipeline_id, 'pgqueue.enqueue: next_jobs');
        PERFORM pgqueue._check_stored_dependencies(enqueue.next_jobs, 'pgqueue.enqueue: next_jobs');
    END IF;
    IF enqueue.pipeline_id IS NOT NULL AND pgqueue._pipeline_cancelled(enqueue.pipeline_id) THEN
        RAISE EXCEPTION 'pgqueue.enqueue: pipeline % was cancelled', enqueue.pipeline_id
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- The pending job the key merges into (see _merge_target), before the
    -- dependencies, which a merge does not take (checked, not locked): holding one while
    -- it waited for the merge target, an enqueue deadlocked with a transition that locks
    -- both, the older first (a completion queueing its dependents, a cancellation
    -- cancelling them). Holding the merge target, it waits for nothing more.
    IF enqueue.dedup_key IS NOT NULL THEN
        PERFORM pgqueue._lock_dedup_key(enqueue.dedup_key);
        v_id := pgqueue._merge_target(enqueue.dedup_key);
        IF v_id IS NOT NULL THEN
            IF cardinality(v_deps) > 0 THEN
                PERFORM pgqueue._check_dependencies(v_deps, 'pgqueue.enqueue');
            END IF;
            PERFORM pgqueue._announce_held(ARRAY[v_id]);  -- merged into a pending job, now held
            RETURN v_id;
        END IF;
    END IF;
    IF cardinality(v_deps) > 0 THEN
        v_succeeded := pgqueue._lock_dependencies(v_deps, 'pgqueue.enqueue');
    END IF;

    INSERT INTO pgqueue.jobs AS j
        (queue, job_type, payload, state, priority, scope, dedup_key, max_attempts, run_after, pipeline_id,
         next_jobs)
    VALUES (coalesce(enqueue.queue, 'default'), enqueue.job_type, coalesce(enqueue.payload, '{}'),
            CASE WHEN v_deps <@ v_succeeded THEN 'queued' ELSE 'waiting' END,
            coalesce(enqueue.priority, 0), nullif(enqueue.scope, 'null'), enqueue.dedup_key,
            coalesce(enqueue.max_attempts,
                     (SELECT s.value::int FROM pgqueue.settings s WHERE s.name = 'max_attempts'),
                     pgqueue._setting_int('max_attempts')), coalesce(enqueue.run_after, now()),
            enqueue.pipeline_id, enqueue.next_jobs)
    -- A pending job with the key exists: lock it (it cannot be claimed before
    -- this transaction ends) and return it instead.
    ON CONFLICT (dedup_key) WHERE state IN ('waiting', 'queued') AND dedup_key IS NOT NULL
    DO UPDATE SET dedup_key = excluded.dedup_key
    RETURNING j.id, j.xmax = 0 INTO v_id, v_inserted;

    IF NOT v_inserted THEN
        PERFORM pgqueue._announce_held(ARRAY[v_id]);  -- merged into a pending job, now held
    END IF;

    IF v_inserted AND cardinality(v_deps) > 0 THEN
        INSERT INTO pgqueue.job_dependencies (job_id, depends_on) SELECT v_id, d FROM unnest(v_deps) d;
        -- Fan-in counter: the dependencies not succeeded yet.
        UPDATE pgqueue.jobs j SET pending_deps = cardinality(v_deps) - cardinality(v_succeeded)
        WHERE j.id = v_id AND cardinality(v_deps) > cardinality(v_succeeded);
    END IF;
    RETURN v_id;
END
$$;
COMMENT ON FUNCTION pgqueue.enqueue(text, jsonb, text, jsonb, text, timestamptz, int, int, uuid, jsonb, bigint[]) IS
    'Create one job and return its id. With dedup_key, returns the pending job with that key instead of '
    'creating another. With depends_on, the job waits until those jobs succeed. next_jobs are created when it '
    'succeeds. Bad input raises an error naming the parameter and writes nothing.';

-- PL/pgSQL for its cached plan, as complete_many (05_finish.sql): a SQL body
-- that cannot be inlined is planned again on every call.
CREATE FUNCTION pgqueue.enqueue_many(specs jsonb) RETURNS SETOF bigint
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY SELECT u.id FROM unnest(pgqueue._insert_specs(specs, NULL, NULL, 'pgqueue.enqueue_many'))
        WITH ORDINALITY AS u(id, ord)
    ORDER BY u.ord;
END
$$;
COMMENT ON FUNCTION pgqueue.enqueue_many(jsonb) IS
    'Create many jobs in one statement (one notification per queue) from an array of specs: objects with '
    'enqueue''s parameter names, plus "key"/"after" for dependencies between them. Returns ids in spec order.';

-- The bulk fast path: one typed array per column, no JSON to take apart per
-- job. It covers the jobs most bulk loads are made of (no dedup key,
-- dependency, follow-ups or pipeline; those go through the spec form above)
-- and makes the same rows the spec form makes from the same values. All
-- checks run over the arrays before the one INSERT, so bad input writes
-- nothing and the error names the first bad element.
CREATE FUNCTION pgqueue.enqueue_many(
    job_types text[],
    payloads jsonb[],
    queues text[] DEFAULT NULL,
    priorities int[] DEFAULT NULL,
    max_attempts int[] DEFAULT NULL,
    run_afters timestamptz[] DEFAULT NULL,
    scopes jsonb[] DEFAULT NULL
) RETURNS SETOF bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_n int := coalesce(cardinality(job_types), 0);
    v_max_attempts int := pgqueue._setting_int('max_attempts');
    v_bad record;
    v_unlocked int[];
BEGIN
    -- A NULL array means "the default for every job"; any other must line up with job_types.
    SELECT a.name, a.n, a.dims INTO v_bad
    FROM (VALUES ('job_types', v_n, array_ndims(job_types)),
                 ('payloads', cardinality(payloads), array_ndims(payloads)),
                 ('queues', cardinality(queues), array_ndims(queues)),
                 ('priorities', cardinality(priorities), array_ndims(priorities)),
                 ('max_attempts', cardinality(enqueue_many.max_attempts), array_ndims(enqueue_many.max_attempts)),
                 ('run_afters', cardinality(run_afters), array_ndims(run_afters)),
                 ('scopes', cardinality(scopes), array_ndims(scopes))) a(name, n, dims)
    WHERE a.n <> v_n OR a.dims > 1
    LIMIT 1;
    IF v_bad.dims > 1 THEN
        RAISE EXCEPTION 'pgqueue.enqueue_many: % must be a one-dimensional array', v_bad.name
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF FOUND THEN
        RAISE EXCEPTION 'pgqueue.enqueue_many: % has % elements but job_types has %; give one per job, or NULL',
            v_bad.name, v_bad.n, v_n
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    SELECT u.i - 1 AS i, CASE
        WHEN u.t IS NULL OR btrim(u.t, E' \t\n\r\f\x0B') = '' THEN 'job_type must be a non-blank string'
        WHEN jsonb_typeof(u.p) <> 'object' THEN format('payload must be a JSON object, got %s', jsonb_typeof(u.p))
        WHEN btrim(u.q, E' \t\n\r\f\x0B') = '' OR octet_length(u.q) > 200 THEN 'queue must be a non-blank string of at most 200 bytes'
        WHEN octet_length(u.s::text) > 1000 THEN 'scope must be at most 1000 bytes of JSON'
        WHEN NOT isfinite(u.r) THEN format('run_after must be a finite timestamp, got %s', u.r)
        ELSE format('max_attempts must be an integer >= 1, got %s', u.m)
    END AS problem INTO v_bad
    FROM unnest(job_types, payloads, queues, enqueue_many.max_attempts, scopes, run_afters)
         WITH ORDINALITY AS u(t, p, q, m, s, r, i)
    WHERE u.t IS NULL OR btrim(u.t, E' \t\n\r\f\x0B') = '' OR jsonb_typeof(u.p) <> 'object' OR btrim(u.q, E' \t\n\r\f\x0B') = ''
       OR octet_length(u.q) > 200 OR octet_length(u.s::text) > 1000 OR u.m < 1 OR NOT isfinite(u.r)
    ORDER BY u.i
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'pgqueue.enqueue_many[%]: %', v_bad.i, v_bad.problem
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    IF scopes IS NOT NULL AND EXISTS (SELECT 1 FROM unnest(scopes) s WHERE s IS NOT NULL AND s <> 'null') THEN
        -- Scoped jobs behind an older queued or running job of their scope (in
        -- the table or earlier in the arrays) are entered blocked; see enqueue().
        -- Ids are drawn first, in array order, so "older" can be decided here.
        v_unlocked := pgqueue._share_scope_order(scopes);
        RETURN QUERY
        WITH ids AS (
            SELECT array_agg(nextval('pgqueue.jobs_id_seq')) AS a FROM generate_series(1, v_n)
        ), ins AS (
            INSERT INTO pgqueue.jobs AS j
                (id, queue, job_type, payload, state, priority, scope, max_attempts, run_after, scope_blocked)
            SELECT u.id, coalesce(u.q, 'default'), u.t, coalesce(u.p, '{}'), 'queued', coalesce(u.pr, 0), u.s,
                   coalesce(u.m, v_max_attempts), coalesce(u.ra, now()),
                   u.s IS NOT NULL AND (row_number() OVER (PARTITION BY u.s ORDER BY u.i) > 1
                                        OR pgqueue._scope_lock_key(u.s) NOT IN (SELECT unnest(v_unlocked))
                                           AND pgqueue._behind_older(u.s, u.id))
            -- The ids unnested beside the arrays: "ids.a[x.i]" carried the whole id array
            -- in every row into the window's sort (20,000 scoped jobs: 3 GB sorted on disk,
            -- 7 s; a scale review).
            FROM (SELECT x.id, x.t, x.p, x.q, x.pr, x.m, x.ra, nullif(x.s, 'null') AS s, x.i
                  FROM unnest(job_types, payloads, queues, priorities, enqueue_many.max_attempts, run_afters,
                              scopes, (SELECT ids.a FROM ids)) WITH ORDINALITY AS x(t, p, q, pr, m, ra, s, id, i)) u
            ORDER BY u.i
            RETURNING j.id
        )
        SELECT ins.id FROM ins ORDER BY ins.id;
        RETURN;
    END IF;

    -- Rows are inserted, and so numbered and returned, in array order: the only
    -- source is one function scan, which yields unnest's rows in order (an ORDER BY
    -- would add a sort of every row for nothing).
    RETURN QUERY
    WITH ins AS (
        INSERT INTO pgqueue.jobs AS j (queue, job_type, payload, state, priority, scope, max_attempts, run_after)
        SELECT coalesce(u.q, 'default'), u.t, coalesce(u.p, '{}'), 'queued', coalesce(u.pr, 0), nullif(u.s, 'null'),
               coalesce(u.m, v_max_attempts), coalesce(u.ra, now())
        FROM unnest(job_types, payloads, queues, priorities, enqueue_many.max_attempts, run_afters, scopes)
             AS u(t, p, q, pr, m, ra, s)
        RETURNING j.id
    )
    SELECT ins.id FROM ins;
END
$$;
COMMENT ON FUNCTION pgqueue.enqueue_many(text[], jsonb[], text[], int[], int[], timestamptz[], jsonb[]) IS
    'Bulk fast path: create one job per element of job_types, with the other arrays (NULL = defaults for all; '
    'NULL elements = that job''s default) giving payload, queue, priority, max_attempts, run_after and scope. '
    'Same rows and checks as the spec form; no dedup_key, depends_on, next_jobs or pipeline_id here. '
    'One INSERT, ids in array order.';
