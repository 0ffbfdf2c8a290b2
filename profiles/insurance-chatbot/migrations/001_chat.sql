-- The backend's schema (Spring Boot's JPA entities in the guide's stack)
CREATE TABLE chat_session (
    id bigserial PRIMARY KEY,
    customer_id text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE chat_message (
    id bigserial PRIMARY KEY,
    session_id bigint NOT NULL REFERENCES chat_session (id),
    role text NOT NULL CHECK (role IN ('user', 'assistant')),
    body text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE faq (
    id serial PRIMARY KEY,
    question text NOT NULL,
    answer text NOT NULL
);
INSERT INTO faq (question, answer) VALUES
    ('보험금 청구는 어떻게 하나요?', '앱의 보험금 청구 메뉴에서 서류를 올려 주세요.'),
    ('보험료 납입일을 바꿀 수 있나요?', '고객센터 또는 앱에서 변경할 수 있습니다.');
