"""Demo participants: the six hub hospitals of the seed material and a few clinics for each.

The 요양기관기호 below are demonstration numbers shaped like real ones (two-digit region prefix),
not the institutions' real provider numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from hie_schemas.directory import InstitutionKind


@dataclass(frozen=True)
class SeedInstitution:
    code: str
    name: str
    name_en: str
    kind: InstitutionKind
    region: str
    hub: str | None
    departments: tuple[str, ...]
    dicom_ae: str | None = None


HUB_DEPARTMENTS = ("0100", "0200", "0400", "0500", "0600", "1000", "1100", "1600", "2300", "2400")

HUBS: tuple[SeedInstitution, ...] = (
    SeedInstitution(
        "11100001",
        "세브란스병원",
        "Severance Hospital",
        InstitutionKind.HUB,
        "서울",
        "severance",
        HUB_DEPARTMENTS,
    ),
    SeedInstitution(
        "31100002",
        "분당서울대학교병원",
        "Seoul National University Bundang Hospital",
        InstitutionKind.HUB,
        "경기",
        "snubh",
        HUB_DEPARTMENTS,
    ),
    SeedInstitution(
        "25100003",
        "충남대학교병원",
        "Chungnam National University Hospital",
        InstitutionKind.HUB,
        "대전",
        "cnuh",
        HUB_DEPARTMENTS,
    ),
    SeedInstitution(
        "23100004",
        "경북대학교병원",
        "Kyungpook National University Hospital",
        InstitutionKind.HUB,
        "대구",
        "knuh",
        HUB_DEPARTMENTS,
    ),
    SeedInstitution(
        "21100005",
        "부산대학교병원",
        "Pusan National University Hospital",
        InstitutionKind.HUB,
        "부산",
        "pnuh",
        HUB_DEPARTMENTS,
    ),
    SeedInstitution(
        "24100006",
        "전남대학교병원",
        "Chonnam National University Hospital",
        InstitutionKind.HUB,
        "광주",
        "cnuhh",
        HUB_DEPARTMENTS,
    ),
)

_CLINIC_NAMES = (
    ("{city} 연세가정의학과의원", "{city_en} Yonsei Family Medicine Clinic", ("2300",)),
    ("{city} 튼튼내과의원", "{city_en} Teunteun Internal Medicine Clinic", ("0100",)),
    ("{city} 바른정형외과의원", "{city_en} Bareun Orthopaedic Clinic", ("0500", "1600")),
)
_CITY_EN = {
    "서울": "Seoul",
    "경기": "Seongnam",
    "대전": "Daejeon",
    "대구": "Daegu",
    "부산": "Busan",
    "광주": "Gwangju",
}


def _clinics() -> tuple[SeedInstitution, ...]:
    clinics: list[SeedInstitution] = []
    for hub_index, hub in enumerate(HUBS, start=1):
        for n, (name, name_en, departments) in enumerate(_CLINIC_NAMES, start=1):
            code = f"{hub.code[:2]}3{hub_index:02d}{n:03d}"
            clinics.append(
                SeedInstitution(
                    code,
                    name.format(city=hub.region),
                    name_en.format(city_en=_CITY_EN[hub.region]),
                    InstitutionKind.CLINIC,
                    hub.region,
                    hub.hub,
                    departments,
                    dicom_ae=f"PACS{code}",
                )
            )
    return tuple(clinics)


CLINICS = _clinics()
AGENCY = SeedInstitution(
    "99000001",
    "한국보건의료정보원",
    "Korea Health Information Service",
    InstitutionKind.AGENCY,
    "세종",
    None,
    (),
)
AGENCY_CLIENT_ID = "agency"

ALL: tuple[SeedInstitution, ...] = (*HUBS, *CLINICS, AGENCY)


def hub_gateway_ae(slug: str) -> str:
    """The AE title of a hub's imaging gateway (at most 16 characters)."""
    return f"GW_{slug.upper()}"[:16]
