import os
import subprocess
import sys

from instune.data.filters.language import check_language, detect_language
from instune.data.schema import make_record


def conversation(user: str, assistant: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return make_record("src:f.jsonl:line 1", "src", "d", messages)


def test_bundled_model_detects_common_languages_offline():
    # model="lite" is the model inside the wheel; "full" would download 126 MB.
    assert detect_language("Hello, how are you doing today? I hope the weather is nice.")[0] == "en"
    assert detect_language("Bonjour, comment allez-vous aujourd'hui ? J'espère qu'il fait beau.")[0] == "fr"
    language, confidence = detect_language("Wie geht es dir heute? Ich hoffe, das Wetter ist schön.")
    assert language == "de" and confidence > 0.9


def test_rejects_a_confidently_foreign_conversation():
    record = conversation("Wie geht es dir heute?", "Mir geht es gut, danke der Nachfrage. Und dir?")
    reason = check_language(record, allowed=["en"], min_confidence=0.65)
    assert reason.startswith("language 'de' (confidence 0.") and reason.endswith("is not one of en")
    assert check_language(record, allowed=["en", "de"], min_confidence=0.65) is None


def test_keeps_english_short_answers_and_unsure_detections():
    english = conversation("What is the capital of France?", "The capital of France is Paris.")
    assert check_language(english, allowed=["en"], min_confidence=0.65) is None
    # Too few letters to judge: kept whatever the detector would say.
    for answer in ("12", '{"a": 1}', "[3, 1, 2]"):
        assert check_language(conversation("7 + 5 = ?", answer), allowed=["fr"], min_confidence=0.0) is None
    # The same German text is kept when the threshold demands more certainty than the detector has.
    german = conversation("Wie geht es dir heute?", "Mir geht es gut, danke der Nachfrage. Und dir?")
    assert check_language(german, allowed=["en"], min_confidence=1.0) is None


def test_system_prompt_is_not_judged():
    record = conversation("Wie geht es dir heute?", "Mir geht es gut, danke.", system="You are a helpful assistant.")
    assert "'de'" in check_language(record, allowed=["en"], min_confidence=0.5)


def test_detection_never_touches_the_download_cache(tmp_path):
    # A fresh process with an empty cache directory and an unreachable proxy: the bundled model must
    # be enough, and nothing may be written where a downloaded model would go.
    cache = tmp_path / "ftlang_cache"
    dead_proxy = "http://127.0.0.1:9"
    env = {**os.environ, "FTLANG_CACHE": str(cache), "HTTPS_PROXY": dead_proxy, "HTTP_PROXY": dead_proxy}
    code = (
        "from instune.data.filters.language import detect_language;"
        "print(detect_language('Guten Morgen, wie geht es?')[0])"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "de"
    assert not cache.exists() or not any(cache.iterdir())
