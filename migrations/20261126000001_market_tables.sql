-- The five tables of the contract. Column names equal the JSON field names.
-- Each unique key starts with (identifier, timestamp), so its B-tree is also
-- the (key, timestamp DESC) index history reads use (B-trees scan both ways);
-- a second index would only slow every COPY.
-- `stream_seq` is the JetStream sequence of the message that wrote the row's
-- current version (NULL when written in core mode); see the sink's upsert.

CREATE TABLE IF NOT EXISTS tick_data (
    symbol      TEXT             NOT NULL,
    "timestamp" TIMESTAMPTZ      NOT NULL,
    price       DOUBLE PRECISION NOT NULL,
    volume      BIGINT           NOT NULL,
    side        TEXT             NOT NULL,
    seq         BIGINT           NOT NULL,
    CONSTRAINT tick_data_key UNIQUE (symbol, "timestamp", seq)
);

CREATE TABLE IF NOT EXISTS candles_1m (
    symbol      TEXT             NOT NULL,
    "timestamp" TIMESTAMPTZ      NOT NULL,
    open        DOUBLE PRECISION NOT NULL,
    high        DOUBLE PRECISION NOT NULL,
    low         DOUBLE PRECISION NOT NULL,
    close       DOUBLE PRECISION NOT NULL,
    volume      BIGINT           NOT NULL,
    value       DOUBLE PRECISION,
    stream_seq  BIGINT,
    CONSTRAINT candles_1m_key UNIQUE (symbol, "timestamp")
);

CREATE TABLE IF NOT EXISTS foreign_flow (
    symbol      TEXT             NOT NULL,
    "timestamp" TIMESTAMPTZ      NOT NULL,
    buy_volume  BIGINT           NOT NULL,
    sell_volume BIGINT           NOT NULL,
    buy_value   DOUBLE PRECISION NOT NULL,
    sell_value  DOUBLE PRECISION NOT NULL,
    room        BIGINT,
    stream_seq  BIGINT,
    CONSTRAINT foreign_flow_key UNIQUE (symbol, "timestamp")
);

CREATE TABLE IF NOT EXISTS index_snapshots (
    index_name   TEXT             NOT NULL,
    "timestamp"  TIMESTAMPTZ      NOT NULL,
    value        DOUBLE PRECISION NOT NULL,
    change       DOUBLE PRECISION NOT NULL,
    change_pct   DOUBLE PRECISION NOT NULL,
    volume       BIGINT           NOT NULL,
    traded_value DOUBLE PRECISION NOT NULL,
    advances     BIGINT,
    declines     BIGINT,
    unchanged    BIGINT,
    stream_seq   BIGINT,
    CONSTRAINT index_snapshots_key UNIQUE (index_name, "timestamp")
);

CREATE TABLE IF NOT EXISTS derivatives (
    contract      TEXT             NOT NULL,
    "timestamp"   TIMESTAMPTZ      NOT NULL,
    price         DOUBLE PRECISION NOT NULL,
    basis         DOUBLE PRECISION NOT NULL,
    open_interest BIGINT           NOT NULL,
    volume        BIGINT           NOT NULL,
    stream_seq    BIGINT,
    CONSTRAINT derivatives_key UNIQUE (contract, "timestamp")
);
