"""The fixed facts of the service: participating banks and regions.

These come from the design card (the source article) and must stay true:
16 national banks, and 16 pilot regions opened in two batches (Dec 2021:
Shanghai, Yunnan; Mar 2022: fourteen more). Other provinces exist in the
registry but start closed, as they did in the pilot.

Bank codes are the common English abbreviations; `interbank_code` is the
bank's three-digit code in the national interbank payment system (CNAPS).
BIN prefixes are real issuer prefixes used by each bank, with the card number
length that bank issues under them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date


@dataclass(frozen=True)
class Bin:
    """An issuer prefix and the length of the numbers issued under it."""

    prefix: str
    length: int


@dataclass(frozen=True)
class BankInfo:
    code: str
    name: str
    english_name: str
    interbank_code: str
    debit_bins: tuple[Bin, ...]
    credit_bins: tuple[Bin, ...]


BANKS: tuple[BankInfo, ...] = (
    BankInfo(
        "ICBC",
        "中国工商银行",
        "Industrial and Commercial Bank of China",
        "102",
        (Bin("622202", 19), Bin("621226", 19)),
        (Bin("622230", 16), Bin("625939", 16)),
    ),
    BankInfo(
        "ABC",
        "中国农业银行",
        "Agricultural Bank of China",
        "103",
        (Bin("622848", 19), Bin("622845", 19)),
        (Bin("622836", 16), Bin("625996", 16)),
    ),
    BankInfo(
        "BOC",
        "中国银行",
        "Bank of China",
        "104",
        (Bin("621661", 19), Bin("621785", 19)),
        (Bin("625905", 16), Bin("622760", 16)),
    ),
    BankInfo(
        "CCB",
        "中国建设银行",
        "China Construction Bank",
        "105",
        (Bin("621700", 19), Bin("436742", 19)),
        (Bin("436728", 16), Bin("625964", 16)),
    ),
    BankInfo(
        "BOCOM",
        "交通银行",
        "Bank of Communications",
        "301",
        (Bin("622262", 19), Bin("622260", 19)),
        (Bin("622252", 16), Bin("622258", 16)),
    ),
    BankInfo(
        "PSBC",
        "中国邮政储蓄银行",
        "Postal Savings Bank of China",
        "403",
        (Bin("621799", 19), Bin("622188", 19)),
        (Bin("622812", 16), Bin("625919", 16)),
    ),
    BankInfo(
        "CITIC",
        "中信银行",
        "China CITIC Bank",
        "302",
        (Bin("621773", 16), Bin("622690", 16)),
        (Bin("433670", 16), Bin("622918", 16)),
    ),
    BankInfo(
        "CEB",
        "中国光大银行",
        "China Everbright Bank",
        "303",
        (Bin("622660", 16), Bin("621489", 16)),
        (Bin("622663", 16), Bin("625978", 16)),
    ),
    BankInfo(
        "CMB",
        "招商银行",
        "China Merchants Bank",
        "308",
        (Bin("621483", 16), Bin("622588", 16)),
        (Bin("622575", 16), Bin("439225", 16)),
    ),
    BankInfo(
        "SPDB",
        "上海浦东发展银行",
        "Shanghai Pudong Development Bank",
        "310",
        (Bin("621792", 16), Bin("622521", 16)),
        (Bin("622516", 16), Bin("625993", 16)),
    ),
    BankInfo(
        "CMBC",
        "中国民生银行",
        "China Minsheng Bank",
        "305",
        (Bin("622622", 16), Bin("621691", 16)),
        (Bin("415599", 16), Bin("622617", 16)),
    ),
    BankInfo(
        "HXB",
        "华夏银行",
        "Hua Xia Bank",
        "304",
        (Bin("622632", 16), Bin("623020", 19)),
        (Bin("622638", 16), Bin("625967", 16)),
    ),
    BankInfo(
        "PAB",
        "平安银行",
        "Ping An Bank",
        "307",
        (Bin("621626", 16), Bin("623058", 19)),
        (Bin("622155", 16), Bin("625360", 16)),
    ),
    BankInfo(
        "CIB",
        "兴业银行",
        "Industrial Bank",
        "309",
        (Bin("622909", 18), Bin("622908", 18)),
        (Bin("451290", 16), Bin("625087", 16)),
    ),
    BankInfo(
        "CGB",
        "广发银行",
        "China Guangfa Bank",
        "306",
        (Bin("622568", 16), Bin("621462", 19)),
        (Bin("625805", 16), Bin("520152", 16)),
    ),
    BankInfo(
        "CZB",
        "浙商银行",
        "China Zheshang Bank",
        "316",
        (Bin("621330", 19), Bin("621332", 19)),
        (Bin("625821", 16), Bin("622309", 16)),
    ),
)

BANKS_BY_CODE: dict[str, BankInfo] = {bank.code: bank for bank in BANKS}


@dataclass(frozen=True)
class RegionInfo:
    """A province-level region, by its GB/T 2260 code."""

    code: str
    name: str
    pilot_open_date: date | None  # None: not in the pilot batches, starts closed

    @property
    def pilot_batch(self) -> int | None:
        """1 (Dec 2021) or 2 (Mar 2022) for the pilot regions, None for the others."""
        return PILOT_BATCHES.get(self.pilot_open_date) if self.pilot_open_date else None

    @property
    def id_prefix(self) -> str:
        """The first two digits of resident ID numbers registered in this region."""
        return self.code[:2]


PILOT_BATCH_1 = date(2021, 12, 1)
PILOT_BATCH_2 = date(2022, 3, 1)
PILOT_BATCHES = {PILOT_BATCH_1: 1, PILOT_BATCH_2: 2}

REGIONS: tuple[RegionInfo, ...] = (
    RegionInfo("110000", "北京市", PILOT_BATCH_2),
    RegionInfo("120000", "天津市", None),
    RegionInfo("130000", "河北省", None),
    RegionInfo("140000", "山西省", PILOT_BATCH_2),
    RegionInfo("150000", "内蒙古自治区", None),
    RegionInfo("210000", "辽宁省", None),
    RegionInfo("220000", "吉林省", PILOT_BATCH_2),
    RegionInfo("230000", "黑龙江省", PILOT_BATCH_2),
    RegionInfo("310000", "上海市", PILOT_BATCH_1),
    RegionInfo("320000", "江苏省", None),
    RegionInfo("330000", "浙江省", PILOT_BATCH_2),
    RegionInfo("340000", "安徽省", PILOT_BATCH_2),
    RegionInfo("350000", "福建省", PILOT_BATCH_2),
    RegionInfo("360000", "江西省", None),
    RegionInfo("370000", "山东省", None),
    RegionInfo("410000", "河南省", PILOT_BATCH_2),
    RegionInfo("420000", "湖北省", None),
    RegionInfo("430000", "湖南省", PILOT_BATCH_2),
    RegionInfo("440000", "广东省", None),
    RegionInfo("450000", "广西壮族自治区", None),
    RegionInfo("460000", "海南省", PILOT_BATCH_2),
    RegionInfo("500000", "重庆市", PILOT_BATCH_2),
    RegionInfo("510000", "四川省", None),
    RegionInfo("520000", "贵州省", PILOT_BATCH_2),
    RegionInfo("530000", "云南省", PILOT_BATCH_1),
    RegionInfo("540000", "西藏自治区", None),
    RegionInfo("610000", "陕西省", PILOT_BATCH_2),
    RegionInfo("620000", "甘肃省", None),
    RegionInfo("630000", "青海省", None),
    RegionInfo("640000", "宁夏回族自治区", None),
    RegionInfo("650000", "新疆维吾尔自治区", PILOT_BATCH_2),
)

REGIONS_BY_CODE: dict[str, RegionInfo] = {region.code: region for region in REGIONS}
PILOT_REGIONS: tuple[RegionInfo, ...] = tuple(r for r in REGIONS if r.pilot_open_date is not None)
