"""The words every front-end shows alike (layout, errors, institution and exchange kinds), Korean
first; each app's catalog adds its own and may override one of these."""

from __future__ import annotations

KO: dict[str, str] = {
    "skip": "본문 바로가기",
    "nav.label": "주 메뉴",
    "nav.sign_out": "로그아웃",
    "lang.switch": "English",
    "col.code": "요양기관기호",
    "col.name": "기관명",
    "col.region": "지역",
    "col.reason": "사유",
    "error.400": "입력한 내용을 확인해 주세요",
    "error.401": "로그인이 필요합니다",
    "error.403": "허용되지 않은 요청입니다",
    "error.404": "찾을 수 없습니다",
    "error.422": "처리할 수 없는 내용입니다",
    "error.503": "잠시 후 다시 시도해 주세요",
    "kind.hub": "거점의료기관",
    "kind.public-agency": "공공기관",
    "kind.agency": "전문기관",
    "exchange.referral": "진료의뢰",
    "exchange.return": "진료회송",
    "exchange.consult-reply": "회신",
    "exchange.transfer": "전원",
    "exchange.public-agency": "공공기관 제출",
}

EN: dict[str, str] = {
    "skip": "Skip to main content",
    "nav.label": "Main menu",
    "nav.sign_out": "Sign out",
    "lang.switch": "한국어",
    "col.code": "Provider number",
    "col.name": "Name",
    "col.region": "Region",
    "col.reason": "Reason",
    "error.400": "Please check what you entered",
    "error.401": "Please sign in",
    "error.403": "This request is not allowed",
    "error.404": "Not found",
    "error.422": "This cannot be processed",
    "error.503": "Please try again shortly",
    "kind.hub": "hub hospital",
    "kind.public-agency": "public agency",
    "kind.agency": "operating agency",
    "exchange.referral": "referral",
    "exchange.return": "return",
    "exchange.consult-reply": "consult reply",
    "exchange.transfer": "transfer",
    "exchange.public-agency": "public agency submission",
}

STRINGS = {"ko": KO, "en": EN}
