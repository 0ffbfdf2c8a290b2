-- The RAG store: places with an embedding (pgvector) and an index for nearest-neighbour search
CREATE EXTENSION IF NOT EXISTS vector;
CREATE TABLE places (
    id serial PRIMARY KEY,
    name text NOT NULL,
    region text NOT NULL,
    embedding vector(8) NOT NULL
);
CREATE INDEX places_embedding_idx ON places USING hnsw (embedding vector_l2_ops);
INSERT INTO places (name, region, embedding) VALUES
    ('광장시장', '서울', '[0.9,0.1,0.2,0.3,0.1,0.0,0.5,0.2]'),
    ('해운대', '부산', '[0.1,0.8,0.3,0.2,0.6,0.1,0.0,0.4]'),
    ('성산일출봉', '제주', '[0.2,0.3,0.9,0.1,0.2,0.7,0.3,0.1]');
